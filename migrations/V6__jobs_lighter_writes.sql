-- Fewer writes per job on the hot path (measured in BENCHMARKS.md).
--
-- History and outbox rows are only ever written by the statement that has
-- just inserted or updated their job (store.rs derives job_id from RETURNING),
-- so the foreign keys re-checked a row the same statement had just written,
-- four times per job, each check locking it. What the keys still gave,
-- removing a job's rows with it, is one statement-level trigger now: it runs
-- once per DELETE on jobs (retention, a deleted user's cascade), not per row.
ALTER TABLE job_events DROP CONSTRAINT job_events_job_id_fkey;
ALTER TABLE job_outbox DROP CONSTRAINT job_outbox_job_id_fkey;

CREATE FUNCTION jobs_delete_dependents() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM job_events WHERE job_id IN (SELECT id FROM gone);
    DELETE FROM job_outbox WHERE job_id IN (SELECT id FROM gone);
    RETURN NULL;
END
$$;

CREATE TRIGGER jobs_delete_dependents
    AFTER DELETE ON jobs REFERENCING OLD TABLE AS gone
    FOR EACH STATEMENT EXECUTE FUNCTION jobs_delete_dependents();

-- Only keyed jobs need the uniqueness index; unkeyed ones (most) no longer
-- add an entry to it on every insert and every transition.
CREATE UNIQUE INDEX jobs_user_idempotency_key_idx ON jobs (user_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
ALTER TABLE jobs DROP CONSTRAINT jobs_user_idempotency_key;

-- History is only ever read per job, in order: one index, (job_id, id), is
-- both the key and the lookup, instead of a key on id plus that index.
ALTER TABLE job_events DROP CONSTRAINT job_events_pkey;
ALTER TABLE job_events ADD PRIMARY KEY (job_id, id);
DROP INDEX job_events_job_id_idx;

-- A job has at most one outbox row (from creation or re-queueing until it
-- starts): key the outbox by job, one index instead of two.
DELETE FROM job_outbox a USING job_outbox b WHERE a.job_id = b.job_id AND a.id < b.id;
ALTER TABLE job_outbox DROP COLUMN id;
DROP INDEX job_outbox_job_id_idx;
ALTER TABLE job_outbox ADD PRIMARY KEY (job_id);
