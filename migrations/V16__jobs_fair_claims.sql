-- ClaimJobs takes turns between users: each user's due queued jobs of a
-- kind, highest priority first, then oldest, found per user by a loose scan
-- of (kind, user_id). Replaces the per-kind index the claim used before.
CREATE INDEX jobs_queued_fair_claim_idx ON jobs (kind, user_id, priority DESC, run_at, id)
    WHERE status = 'queued';
DROP INDEX jobs_queued_claim_idx;
