-- Per-user keyed memories (memory service).

-- The tags of a memory as one text for its search document. array_to_string is
-- only STABLE, so a generated column cannot call it directly; joining text[]
-- with a constant separator depends on no setting, so IMMUTABLE is true here.
CREATE FUNCTION memories_tags_text(tags text[]) RETURNS text
    LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
    RETURN array_to_string(tags, ' ');

CREATE TABLE memories (
    user_id       uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- Byte order ("C") so listing, prefix ranges and page cursors agree with the index.
    key           text COLLATE "C" NOT NULL CHECK (key ~ '^[A-Za-z0-9._:/-]+$'),
    content       text NOT NULL,
    tags          text[] NOT NULL DEFAULT '{}',
    metadata      jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(metadata) = 'object'),
    version       bigint NOT NULL DEFAULT 1 CHECK (version >= 1),
    created_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL,
    content_bytes integer GENERATED ALWAYS AS (octet_length(content)) STORED,
    -- Key words (split on its punctuation) and tags weigh A, content C.
    search        tsvector GENERATED ALWAYS AS (
        setweight(to_tsvector('english'::regconfig, translate(key, '._:/-', '     ')), 'A')
        || setweight(to_tsvector('english'::regconfig, memories_tags_text(tags)), 'A')
        || setweight(to_tsvector('english'::regconfig, content), 'C')
    ) STORED,
    PRIMARY KEY (user_id, key)
);

-- Newest first for the workspace; also covers its count, byte total and
-- last update with an index-only scan.
CREATE INDEX memories_user_updated_idx
    ON memories (user_id, updated_at DESC, key) INCLUDE (content_bytes);
CREATE INDEX memories_tags_idx ON memories USING gin (tags);
CREATE INDEX memories_search_idx ON memories USING gin (search);

-- How many of a user's memories carry each tag, kept by the triggers below so
-- the workspace reads a few rows instead of unnesting every memory's tags.
-- No foreign key: the rows follow `memories` (whose rows cascade with the
-- user, and each deletion decrements), and a key here would make a user's
-- cascade fail whenever it reached these rows before the memories.
CREATE TABLE memory_tag_counts (
    user_id  uuid NOT NULL,
    tag      text NOT NULL,
    memories bigint NOT NULL,
    PRIMARY KEY (user_id, tag)
);

-- Statement-level, over the transition tables: one write to each touched
-- (user, tag) per statement however many memories it changed (a user's
-- cascade delete included), applied in (user, tag) order so concurrent
-- writers lock count rows in the same order. Counts that reach zero go.
CREATE FUNCTION memories_count_tags() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    owners uuid[];
    tags   text[];
    deltas bigint[];
BEGIN
    IF TG_OP = 'INSERT' THEN
        SELECT array_agg(d.user_id ORDER BY d.user_id, d.tag), array_agg(d.tag ORDER BY d.user_id, d.tag),
               array_agg(d.n ORDER BY d.user_id, d.tag)
        INTO owners, tags, deltas
        FROM (SELECT r.user_id, t.tag, count(*) AS n
              FROM new_rows AS r, unnest(r.tags) AS t(tag) GROUP BY 1, 2) AS d;
    ELSIF TG_OP = 'DELETE' THEN
        SELECT array_agg(d.user_id ORDER BY d.user_id, d.tag), array_agg(d.tag ORDER BY d.user_id, d.tag),
               array_agg(d.n ORDER BY d.user_id, d.tag)
        INTO owners, tags, deltas
        FROM (SELECT r.user_id, t.tag, -count(*) AS n
              FROM old_rows AS r, unnest(r.tags) AS t(tag) GROUP BY 1, 2) AS d;
    ELSE
        SELECT array_agg(d.user_id ORDER BY d.user_id, d.tag), array_agg(d.tag ORDER BY d.user_id, d.tag),
               array_agg(d.n ORDER BY d.user_id, d.tag)
        INTO owners, tags, deltas
        FROM (SELECT c.user_id, c.tag, sum(c.n) AS n
              FROM (SELECT r.user_id, t.tag, 1 AS n FROM new_rows AS r, unnest(r.tags) AS t(tag)
                    UNION ALL
                    SELECT r.user_id, t.tag, -1 FROM old_rows AS r, unnest(r.tags) AS t(tag)) AS c
              GROUP BY 1, 2 HAVING sum(c.n) <> 0) AS d;
    END IF;
    IF owners IS NULL THEN
        RETURN NULL;
    END IF;
    INSERT INTO memory_tag_counts AS c (user_id, tag, memories)
    SELECT * FROM unnest(owners, tags, deltas) AS d(user_id, tag, n) ORDER BY 1, 2
    ON CONFLICT (user_id, tag) DO UPDATE SET memories = c.memories + EXCLUDED.memories;
    DELETE FROM memory_tag_counts AS c
    USING unnest(owners, tags) AS d(user_id, tag)
    WHERE c.user_id = d.user_id AND c.tag = d.tag AND c.memories <= 0;
    RETURN NULL;
END
$$;

CREATE TRIGGER memories_count_tags_insert
    AFTER INSERT ON memories REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION memories_count_tags();
CREATE TRIGGER memories_count_tags_update
    AFTER UPDATE ON memories REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION memories_count_tags();
CREATE TRIGGER memories_count_tags_delete
    AFTER DELETE ON memories REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION memories_count_tags();
