-- Workers in any language (ClaimJobs), progress, schedule timeouts, and the
-- bookkeeping that makes re-deliveries and repeated starts exact.

-- The attempt count of the job when its outbox row was written: 0 for a new
-- job, the failed attempt's number for a retry or a reaped lease. The
-- immediate publication of a new job marks only its own (attempt 0) row, not
-- a retry's row that replaced it meanwhile.
ALTER TABLE job_outbox ADD COLUMN attempt integer NOT NULL DEFAULT 0;

-- The delivery (stream entry id) that started the running attempt: a worker
-- repeating its StartJob for the same delivery gets that attempt back.
ALTER TABLE jobs ADD COLUMN delivery_id text;

-- The running attempt's latest progress, as reported by its heartbeats.
ALTER TABLE jobs ADD COLUMN progress jsonb;

-- How long a queued job may wait past its run_at for a worker of its kind;
-- schedule_deadline is run_at + schedule_timeout, set whenever the job is
-- queued (creation, retry, reaped lease) so the sweeper finds it by index.
ALTER TABLE jobs ADD COLUMN schedule_timeout interval NOT NULL DEFAULT interval '1 hour';
ALTER TABLE jobs ADD COLUMN schedule_deadline timestamptz;
UPDATE jobs SET schedule_deadline = run_at + schedule_timeout WHERE status = 'queued';
CREATE INDEX jobs_queued_deadline_idx ON jobs (schedule_deadline) WHERE status = 'queued';

-- ClaimJobs: due queued jobs of a kind, highest priority first, then oldest.
CREATE INDEX jobs_queued_claim_idx ON jobs (kind, priority DESC, run_at, id)
    WHERE status = 'queued';

-- A queued job that no worker took before its schedule deadline.
ALTER TABLE job_events DROP CONSTRAINT job_events_event_check;
ALTER TABLE job_events ADD CONSTRAINT job_events_event_check
    CHECK (event IN ('created', 'started', 'succeeded', 'failed', 'retry_scheduled',
                     'cancel_requested', 'cancelled', 'lease_expired', 'schedule_timeout'));
