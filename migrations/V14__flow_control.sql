-- Flow control per kind and fairness between users (issue 21).

-- Flow control: a start of a limited kind counts the kind's running jobs
-- (under a per-kind advisory lock), so that count must be cheap.
CREATE INDEX jobs_running_kind_idx ON jobs (kind) WHERE status = 'running';

-- One token bucket per rate-limited kind, shared by every jobs replica:
-- `tokens` as of `refilled_at`; a start refills it (rate x elapsed, capped
-- at the burst) and takes one token. Rows of kinds no longer limited are
-- harmless (never read).
CREATE TABLE kind_rate_buckets (
    kind        text PRIMARY KEY,
    tokens      float8 NOT NULL,
    refilled_at timestamptz NOT NULL
);

-- Fairness: the outbox knows each row's kind and owner, so the relay fills
-- a kind's (short) stream taking turns between the users with jobs waiting.
ALTER TABLE job_outbox ADD COLUMN kind text;
ALTER TABLE job_outbox ADD COLUMN user_id uuid;
UPDATE job_outbox o SET kind = j.kind, user_id = j.user_id FROM jobs j WHERE j.id = o.job_id;
-- Rows whose job is gone are never published (StartJob would refuse them).
DELETE FROM job_outbox WHERE kind IS NULL;
ALTER TABLE job_outbox ALTER COLUMN kind SET NOT NULL;
ALTER TABLE job_outbox ALTER COLUMN user_id SET NOT NULL;
-- Per kind: the distinct users with rows (a loose index scan), then each
-- user's rows in the order they are published (priority first).
CREATE INDEX job_outbox_kind_user_idx ON job_outbox (kind, user_id, priority DESC, deliver_at);
