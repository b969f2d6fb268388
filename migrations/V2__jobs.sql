-- Jobs (jobs service): the jobs themselves, their transition history, and the
-- outbox that guarantees delivery to the Redis stream.

CREATE TABLE jobs (
    id               uuid PRIMARY KEY,  -- v7: sorts by creation time
    user_id          uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    kind             text NOT NULL CHECK (kind ~ '^[a-z0-9._-]{1,128}$'),
    payload          jsonb NOT NULL,
    status           text NOT NULL DEFAULT 'queued'
                     CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    priority         integer NOT NULL DEFAULT 0 CHECK (priority BETWEEN -100 AND 100),
    attempt          integer NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    max_attempts     integer NOT NULL CHECK (max_attempts BETWEEN 1 AND 100),
    output           jsonb,
    error            text NOT NULL DEFAULT '',
    run_at           timestamptz NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    started_at       timestamptz,
    finished_at      timestamptz,
    cancel_requested boolean NOT NULL DEFAULT false,
    -- Set while running: the attempt's lease and who holds it.
    lease_expires_at timestamptz,
    worker_id        text,
    -- Grows by one on every transition; live updates use it to drop stale snapshots.
    version          bigint NOT NULL DEFAULT 1,
    idempotency_key  text CHECK (length(idempotency_key) BETWEEN 1 AND 256),
    -- NULL keys are distinct, so only keyed jobs are deduplicated.
    CONSTRAINT jobs_user_idempotency_key UNIQUE (user_id, idempotency_key)
);

-- ListJobs: newest first (id is v7), optionally by status.
CREATE INDEX jobs_user_id_idx ON jobs (user_id, id DESC);
CREATE INDEX jobs_user_status_id_idx ON jobs (user_id, status, id DESC);
-- The lease reaper.
CREATE INDEX jobs_running_lease_idx ON jobs (lease_expires_at) WHERE status = 'running';

-- Every transition of a job, for users and operators.
CREATE TABLE job_events (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id    uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    at        timestamptz NOT NULL DEFAULT now(),
    event     text NOT NULL CHECK (event IN ('created', 'started', 'succeeded', 'failed',
                                              'retry_scheduled', 'cancel_requested', 'cancelled',
                                              'lease_expired')),
    status    text NOT NULL,  -- the job's status after the event
    attempt   integer NOT NULL,
    worker_id text,
    error     text
);
CREATE INDEX job_events_job_id_idx ON job_events (job_id, id);

-- Queued jobs to publish on the Redis stream when due. Written in the same
-- transaction as the job (or its retry); deleted when the job starts or is
-- cancelled. After each XADD the row waits (longer each time) and is
-- published again if the job still has not started, so a stream entry lost
-- with Redis's memory does not strand the job.
CREATE TABLE job_outbox (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id       uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    deliver_at   timestamptz NOT NULL DEFAULT now(),
    priority     integer NOT NULL DEFAULT 0,
    published_at timestamptz,  -- last XADD; NULL: never published
    publications integer NOT NULL DEFAULT 0
);
CREATE INDEX job_outbox_due_idx ON job_outbox (deliver_at);
CREATE INDEX job_outbox_job_id_idx ON job_outbox (job_id);
