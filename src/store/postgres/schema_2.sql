-- Schema version 2: counters every replica shares (failed logins), one row per key holding
-- its GCRA "theoretical arrival time" in Unix milliseconds. A row whose time has passed holds
-- no state and is purged.
CREATE TABLE shared_counters (
    key text PRIMARY KEY,
    tat bigint NOT NULL
);
CREATE INDEX shared_counters_by_tat ON shared_counters (tat);
