-- Schedules (jobs service, ScheduleService): cron rules that create a job on
-- each tick, and the record on each job of the tick that created it.

CREATE TABLE schedules (
    id           uuid PRIMARY KEY,  -- v7: sorts by creation time
    user_id      uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name         text NOT NULL CHECK (length(name) BETWEEN 1 AND 128),
    cron         text NOT NULL,
    timezone     text NOT NULL,
    -- The jobs it creates (CreateJob's rules).
    kind         text NOT NULL CHECK (kind ~ '^[a-z0-9._-]{1,128}$'),
    payload      jsonb NOT NULL,
    priority     integer NOT NULL CHECK (priority BETWEEN -100 AND 100),
    max_attempts integer NOT NULL CHECK (max_attempts BETWEEN 1 AND 100),
    paused       boolean NOT NULL DEFAULT false,
    -- The next tick's scheduled time (UTC); the ticker fires it once due.
    next_run_at  timestamptz NOT NULL,
    last_run_at  timestamptz,
    last_job_id  uuid,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT schedules_user_name UNIQUE (user_id, name)
);

-- ListSchedules: newest first.
CREATE INDEX schedules_user_id_idx ON schedules (user_id, id DESC);
-- The ticker: active schedules by due time.
CREATE INDEX schedules_due_idx ON schedules (next_run_at) WHERE NOT paused;

-- A job created by a schedule records which tick created it. No foreign key:
-- deleting a schedule keeps its jobs (and their record of where they came
-- from). The unique index makes a second job for the same tick impossible,
-- whatever the ticker does.
ALTER TABLE jobs ADD COLUMN schedule_id uuid;
ALTER TABLE jobs ADD COLUMN scheduled_for timestamptz;
CREATE UNIQUE INDEX jobs_schedule_tick_idx ON jobs (schedule_id, scheduled_for)
    WHERE schedule_id IS NOT NULL;
