-- The reapers find expired jobs by a deadline alone, never by status: an
-- index partial on status looks empty to statistics taken before a burst,
-- so the planner could take any index on that status (a whole backlog) for
-- the reaper's scan. Each deadline is now set only while the job is in the
-- state it bounds (schedule_deadline while queued; lease_expires_at and
-- attempt_deadline while running) and is indexed where it is set. The
-- constraints keep it so: a deadline left behind by a transition would hold
-- a reaper's slots forever (its update skips the row, its scan finds it again).
UPDATE jobs SET schedule_deadline = NULL
    WHERE status <> 'queued' AND schedule_deadline IS NOT NULL;
UPDATE jobs SET lease_expires_at = NULL
    WHERE status <> 'running' AND lease_expires_at IS NOT NULL;
UPDATE jobs SET attempt_deadline = NULL
    WHERE status <> 'running' AND attempt_deadline IS NOT NULL;
ALTER TABLE jobs
    ADD CONSTRAINT jobs_schedule_deadline_only_queued
        CHECK (status = 'queued' OR schedule_deadline IS NULL),
    ADD CONSTRAINT jobs_run_deadlines_only_running
        CHECK (status = 'running' OR (lease_expires_at IS NULL AND attempt_deadline IS NULL));

CREATE INDEX jobs_schedule_deadline_idx ON jobs (schedule_deadline)
    WHERE schedule_deadline IS NOT NULL;
CREATE INDEX jobs_lease_idx ON jobs (lease_expires_at)
    WHERE lease_expires_at IS NOT NULL;
CREATE INDEX jobs_attempt_deadline_idx ON jobs (attempt_deadline)
    WHERE attempt_deadline IS NOT NULL;
DROP INDEX jobs_queued_deadline_idx;
DROP INDEX jobs_running_lease_idx;
DROP INDEX jobs_running_attempt_deadline_idx;
