-- The last version given to each user's key, kept when the memory is
-- deleted. A memory re-created under a deleted key continues after the
-- deleted one's last version, so one key never gets a version twice and a
-- stale expected_version never matches a newer memory. Every put takes this
-- row's lock before it touches the memory (deletes touch only the memory),
-- so the number it takes is always above every one given before.
--
-- Rows stay until their user is deleted: one per key the user ever wrote.
CREATE TABLE memory_versions (
    user_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    key     text COLLATE "C" NOT NULL,
    version bigint NOT NULL CHECK (version >= 1),
    PRIMARY KEY (user_id, key)
);

-- Live memories carry their last version; keys deleted before this
-- migration left no trace, so a memory re-created under one starts at 1.
INSERT INTO memory_versions (user_id, key, version)
SELECT user_id, key, version FROM memories;
