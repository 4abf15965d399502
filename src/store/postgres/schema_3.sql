-- Schema version 3: the job queue's counts kept beside it, so that an enqueue checks its caps
-- in constant time whatever the queue holds: a user's unfinished jobs on their row (locked by
-- the enqueue anyway), the whole queue's in 16 rows over which concurrent transactions spread
-- their changes (the count is their sum).
ALTER TABLE users ADD COLUMN active_jobs integer NOT NULL DEFAULT 0;
CREATE TABLE job_totals (
    shard  smallint PRIMARY KEY,
    active bigint NOT NULL
);
INSERT INTO job_totals SELECT g, 0 FROM generate_series(0, 15) AS g;
UPDATE users u SET active_jobs =
    (SELECT count(*) FROM jobs j WHERE j.user_id = u.id AND j.state IN ('queued', 'running'));
UPDATE job_totals SET active =
    (SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')) WHERE shard = 0;
