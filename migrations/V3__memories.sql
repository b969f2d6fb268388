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
