-- Schema version 3: a user's unfinished jobs by an index of their own, so that the per-user
-- cap an enqueue checks counts at most that many rows, not the user's whole history.
CREATE INDEX jobs_active_by_user ON jobs (user_id) WHERE state IN ('queued', 'running');
