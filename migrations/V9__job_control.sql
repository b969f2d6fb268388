-- Job control: users retry and delete their finished jobs and read their
-- history; an attempt may run at most its job's timeout.

-- CreateJobRequest.timeout: how long one attempt may run (NULL: no limit).
-- attempt_deadline is started_at + attempt_timeout, set whenever an attempt
-- starts (StartJob, ClaimJobs) and meaningful only while the job is running:
-- the reaper fails attempts past it even while they heartbeat.
ALTER TABLE jobs ADD COLUMN attempt_timeout interval;
ALTER TABLE jobs ADD COLUMN attempt_deadline timestamptz;
CREATE INDEX jobs_running_attempt_deadline_idx ON jobs (attempt_deadline)
    WHERE status = 'running' AND attempt_deadline IS NOT NULL;

-- `retried`: RetryJob queued a failed or cancelled job again with a fresh
-- set of attempts. `timed_out`: an attempt ran past its job's timeout.
ALTER TABLE job_events DROP CONSTRAINT job_events_event_check;
ALTER TABLE job_events ADD CONSTRAINT job_events_event_check
    CHECK (event IN ('created', 'started', 'succeeded', 'failed', 'retry_scheduled',
                     'cancel_requested', 'cancelled', 'lease_expired', 'schedule_timeout',
                     'retried', 'timed_out'));
