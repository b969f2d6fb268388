-- The workspace statement now runs on a cached generic plan (see
-- WORKSPACE_NAMESPACE in services/memory/src/store.rs). A generic plan does
-- not know the namespace it serves, and with this per-user index it could
-- walk a user's newest memories of every namespace and filter them row by
-- row (2.2 s for a namespace with no memories next to 100k in ''). Every
-- reader of the newest memories now goes through
-- memories_namespace_updated_idx (user_id, namespace, updated_at DESC, key);
-- one index fewer to maintain on each write.
DROP INDEX memories_user_updated_idx;
