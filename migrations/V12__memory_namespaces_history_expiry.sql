-- Memory namespaces, version history, expiry, and trigger-kept workspace totals.

-- A namespace is an agent's or session's own space inside a user's memory;
-- '' is the default one. (user, namespace, key) is unique.
ALTER TABLE memories
    ADD COLUMN namespace  text COLLATE "C" NOT NULL DEFAULT ''
        CHECK (namespace ~ '^[A-Za-z0-9._:/-]*$'),
    ADD COLUMN expires_at timestamptz;
ALTER TABLE memories DROP CONSTRAINT memories_pkey;
ALTER TABLE memories ADD PRIMARY KEY (user_id, namespace, key);

-- Newest first inside one namespace (workspace recent, search candidates).
CREATE INDEX memories_namespace_updated_idx
    ON memories (user_id, namespace, updated_at DESC, key);
-- Memories that will expire: per user and namespace (what the workspace
-- subtracts until the sweeper has removed them) and in expiry order (what
-- the sweeper takes).
CREATE INDEX memories_namespace_expiry_idx
    ON memories (user_id, namespace, expires_at) INCLUDE (content_bytes, tags)
    WHERE expires_at IS NOT NULL;
CREATE INDEX memories_expiry_idx ON memories (expires_at) WHERE expires_at IS NOT NULL;

ALTER TABLE memory_versions ADD COLUMN namespace text COLLATE "C" NOT NULL DEFAULT '';
ALTER TABLE memory_versions DROP CONSTRAINT memory_versions_pkey;
ALTER TABLE memory_versions ADD PRIMARY KEY (user_id, namespace, key);

-- Earlier versions of live memories. The current version stays in
-- `memories`; each update moves the one it replaces here, and keeps only
-- the newest `keel.memory_versions_kept` (set by the service with each
-- write; 20 when unset). A memory's history goes when the memory goes
-- (delete, expiry sweep, its user's deletion), so a memory re-created under
-- the same key starts a new history (its version numbers still continue).
CREATE TABLE memory_history (
    user_id    uuid NOT NULL,
    namespace  text COLLATE "C" NOT NULL,
    key        text COLLATE "C" NOT NULL,
    version    bigint NOT NULL,
    content    text NOT NULL,
    tags       text[] NOT NULL,
    metadata   jsonb NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    expires_at timestamptz,
    PRIMARY KEY (user_id, namespace, key, version)
);

CREATE FUNCTION memories_keep_history() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    kept bigint := coalesce(nullif(current_setting('keel.memory_versions_kept', true), '')::bigint, 20);
BEGIN
    IF OLD.expires_at <= now() THEN
        -- A put over an expired memory (not swept yet) creates a new one:
        -- the expired one's history goes.
        DELETE FROM memory_history
         WHERE user_id = OLD.user_id AND namespace = OLD.namespace AND key = OLD.key;
        RETURN NULL;
    END IF;
    IF kept > 0 THEN
        INSERT INTO memory_history
            (user_id, namespace, key, version, content, tags, metadata, created_at, updated_at, expires_at)
        VALUES (OLD.user_id, OLD.namespace, OLD.key, OLD.version, OLD.content, OLD.tags,
                OLD.metadata, OLD.created_at, OLD.updated_at, OLD.expires_at)
        ON CONFLICT DO NOTHING;
    END IF;
    DELETE FROM memory_history
     WHERE user_id = NEW.user_id AND namespace = NEW.namespace AND key = NEW.key
       AND version < NEW.version - kept;
    RETURN NULL;
END
$$;

CREATE TRIGGER memories_keep_history
    AFTER UPDATE ON memories
    FOR EACH ROW WHEN (OLD.version <> NEW.version)
    EXECUTE FUNCTION memories_keep_history();

CREATE FUNCTION memories_drop_history() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM memory_history AS h
     USING old_rows AS o
     WHERE h.user_id = o.user_id AND h.namespace = o.namespace AND h.key = o.key;
    RETURN NULL;
END
$$;

CREATE TRIGGER memories_drop_history
    AFTER DELETE ON memories REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION memories_drop_history();

-- Tag counts per namespace, and the memory count and content bytes of each
-- (user, namespace), kept by one statement-level trigger (as in V3) so the
-- workspace reads a few rows whatever the number of memories. Rows include
-- memories that expired but are not swept yet; readers subtract those.
ALTER TABLE memory_tag_counts ADD COLUMN namespace text COLLATE "C" NOT NULL DEFAULT '';
ALTER TABLE memory_tag_counts DROP CONSTRAINT memory_tag_counts_pkey;
ALTER TABLE memory_tag_counts ADD PRIMARY KEY (user_id, namespace, tag);

-- Totals are split over 16 shards per (user, namespace) by key hash:
-- every write of a user touches its totals, and one row would make all of
-- a user's concurrent writes queue on its lock until commit. Readers sum
-- the shards; a shard row goes once both its figures are back at zero.
CREATE FUNCTION memories_shard(key text) RETURNS smallint
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN (hashtext(key) & 15)::smallint;

CREATE TABLE memory_totals (
    user_id       uuid NOT NULL,
    namespace     text COLLATE "C" NOT NULL,
    shard         smallint NOT NULL,
    memories      bigint NOT NULL,
    content_bytes bigint NOT NULL,
    PRIMARY KEY (user_id, namespace, shard)
);

INSERT INTO memory_totals (user_id, namespace, shard, memories, content_bytes)
SELECT user_id, namespace, memories_shard(key), count(*), sum(content_bytes)
FROM memories GROUP BY 1, 2, 3;

DROP TRIGGER memories_count_tags_insert ON memories;
DROP TRIGGER memories_count_tags_update ON memories;
DROP TRIGGER memories_count_tags_delete ON memories;
DROP FUNCTION memories_count_tags();

-- One function per operation (each sees only the transition tables it
-- has), static SQL so plpgsql keeps the plans. Each applies one
-- statement's changes in key order, tag counts before totals, so
-- concurrent writers lock count rows in the same order.
CREATE FUNCTION memories_count_insert() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO memory_tag_counts AS c (user_id, namespace, tag, memories)
    SELECT r.user_id, r.namespace, t.tag, count(*)
      FROM new_rows AS r, unnest(r.tags) AS t(tag)
     GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    ON CONFLICT (user_id, namespace, tag) DO UPDATE SET memories = c.memories + EXCLUDED.memories;
    INSERT INTO memory_totals AS t (user_id, namespace, shard, memories, content_bytes)
    SELECT r.user_id, r.namespace, memories_shard(r.key), count(*), sum(r.content_bytes)
      FROM new_rows AS r
     GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    ON CONFLICT (user_id, namespace, shard) DO UPDATE
        SET memories = t.memories + EXCLUDED.memories,
            content_bytes = t.content_bytes + EXCLUDED.content_bytes;
    RETURN NULL;
END
$$;

CREATE FUNCTION memories_count_delete() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO memory_tag_counts AS c (user_id, namespace, tag, memories)
    SELECT r.user_id, r.namespace, t.tag, -count(*)
      FROM old_rows AS r, unnest(r.tags) AS t(tag)
     GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    ON CONFLICT (user_id, namespace, tag) DO UPDATE SET memories = c.memories + EXCLUDED.memories;
    DELETE FROM memory_tag_counts AS c
     USING (SELECT DISTINCT r.user_id, r.namespace, t.tag
              FROM old_rows AS r, unnest(r.tags) AS t(tag)) AS d
     WHERE c.user_id = d.user_id AND c.namespace = d.namespace AND c.tag = d.tag
       AND c.memories <= 0;
    INSERT INTO memory_totals AS t (user_id, namespace, shard, memories, content_bytes)
    SELECT r.user_id, r.namespace, memories_shard(r.key), -count(*), -sum(r.content_bytes)
      FROM old_rows AS r
     GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    ON CONFLICT (user_id, namespace, shard) DO UPDATE
        SET memories = t.memories + EXCLUDED.memories,
            content_bytes = t.content_bytes + EXCLUDED.content_bytes;
    DELETE FROM memory_totals AS t
     USING (SELECT DISTINCT r.user_id, r.namespace, memories_shard(r.key) AS shard
              FROM old_rows AS r) AS d
     WHERE t.user_id = d.user_id AND t.namespace = d.namespace AND t.shard = d.shard
       AND t.memories = 0 AND t.content_bytes = 0;
    RETURN NULL;
END
$$;

-- An update keeps user, namespace and key (the primary key is never
-- updated), so only tags and content bytes can change.
CREATE FUNCTION memories_count_update() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO memory_tag_counts AS c (user_id, namespace, tag, memories)
    SELECT d.user_id, d.namespace, d.tag, sum(d.n)
      FROM (SELECT r.user_id, r.namespace, t.tag, 1 AS n
              FROM new_rows AS r, unnest(r.tags) AS t(tag)
            UNION ALL
            SELECT r.user_id, r.namespace, t.tag, -1
              FROM old_rows AS r, unnest(r.tags) AS t(tag)) AS d
     GROUP BY 1, 2, 3 HAVING sum(d.n) <> 0 ORDER BY 1, 2, 3
    ON CONFLICT (user_id, namespace, tag) DO UPDATE SET memories = c.memories + EXCLUDED.memories;
    DELETE FROM memory_tag_counts AS c
     USING (SELECT DISTINCT r.user_id, r.namespace, t.tag
              FROM old_rows AS r, unnest(r.tags) AS t(tag)) AS d
     WHERE c.user_id = d.user_id AND c.namespace = d.namespace AND c.tag = d.tag
       AND c.memories <= 0;
    INSERT INTO memory_totals AS t (user_id, namespace, shard, memories, content_bytes)
    SELECT d.user_id, d.namespace, d.shard, 0, sum(d.bytes)
      FROM (SELECT r.user_id, r.namespace, memories_shard(r.key) AS shard, r.content_bytes AS bytes
              FROM new_rows AS r
            UNION ALL
            SELECT r.user_id, r.namespace, memories_shard(r.key), -r.content_bytes
              FROM old_rows AS r) AS d
     GROUP BY 1, 2, 3 HAVING sum(d.bytes) <> 0 ORDER BY 1, 2, 3
    ON CONFLICT (user_id, namespace, shard) DO UPDATE
        SET content_bytes = t.content_bytes + EXCLUDED.content_bytes;
    RETURN NULL;
END
$$;

CREATE TRIGGER memories_count_insert
    AFTER INSERT ON memories REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION memories_count_insert();
CREATE TRIGGER memories_count_update
    AFTER UPDATE ON memories REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION memories_count_update();
CREATE TRIGGER memories_count_delete
    AFTER DELETE ON memories REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION memories_count_delete();
