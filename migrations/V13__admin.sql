-- The admin API: who administers Keel, what admins did, which workers the
-- jobs service has seen, and the index the queue figures read.

-- Users holding the admin role (auth service; read by every server through
-- keel_shared::identity). granted_by NULL: the KEEL_ADMIN_EMAILS bootstrap.
CREATE TABLE admins (
    user_id    uuid PRIMARY KEY REFERENCES users (id) ON DELETE CASCADE,
    granted_at timestamptz NOT NULL DEFAULT now(),
    granted_by uuid REFERENCES users (id) ON DELETE SET NULL
);

-- Every admin action, written in the same transaction as the change it
-- records (each service's store, through keel_shared::audit). No foreign key
-- to users: the record outlives the admin's account, so the email is kept.
CREATE TABLE admin_audit (
    id            uuid PRIMARY KEY,  -- v7
    at            timestamptz NOT NULL DEFAULT now(),
    admin_user_id uuid NOT NULL,
    admin_email   text NOT NULL,
    action        text NOT NULL CHECK (length(action) BETWEEN 1 AND 64),
    target        text NOT NULL CHECK (length(target) <= 256),
    detail        jsonb NOT NULL DEFAULT '{}'::jsonb
);
-- ListAuditEvents: newest first.
CREATE INDEX admin_audit_at_idx ON admin_audit (at DESC, id DESC);

-- Workers as the jobs service last saw them (StartJob(s), ClaimJobs,
-- Heartbeat and the stream workers' announcements), written at most every
-- few seconds per worker per process.
CREATE TABLE workers (
    worker_id    text PRIMARY KEY CHECK (length(worker_id) BETWEEN 1 AND 256),
    kinds        text[] NOT NULL DEFAULT '{}',
    concurrency  integer NOT NULL DEFAULT 0 CHECK (concurrency >= 0),
    last_seen_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX workers_last_seen_at_idx ON workers (last_seen_at DESC);

-- GetQueueStats reads the last hour of job_events. A BRIN index: events are
-- appended in time order, so block ranges summarise it well, and unlike a
-- btree it adds next to nothing to each transition's insert.
CREATE INDEX job_events_at_brin_idx ON job_events USING brin (at);
