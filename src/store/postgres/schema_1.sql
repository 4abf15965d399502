-- edgechat's tables on PostgreSQL, schema version 1. Times are Unix milliseconds (bigint), as
-- in the redb file; names and emails are unique by their lowercase form, which edgechat
-- computes (Rust's lowercasing, the same as the redb file's, whatever the database's locale).

CREATE TABLE users (
    id            uuid PRIMARY KEY,
    username      text NOT NULL,
    email         text NOT NULL,
    name_key      text NOT NULL CONSTRAINT users_username_unique UNIQUE,
    email_key     text NOT NULL CONSTRAINT users_email_unique UNIQUE,
    password_hash text NOT NULL,
    is_admin      boolean NOT NULL,
    disabled      boolean NOT NULL DEFAULT false,
    created_at    bigint NOT NULL
);

CREATE TABLE api_keys (
    id           uuid PRIMARY KEY,
    user_id      uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name         text NOT NULL,
    hash         bytea NOT NULL UNIQUE,
    created_at   bigint NOT NULL,
    last_used_at bigint
);
CREATE INDEX api_keys_by_user ON api_keys (user_id, id);

CREATE TABLE refresh_tokens (
    hash       bytea PRIMARY KEY,
    user_id    uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    family     uuid NOT NULL,
    expires_at bigint NOT NULL,
    rotated    boolean NOT NULL DEFAULT false
);
CREATE INDEX refresh_tokens_by_expiry ON refresh_tokens (expires_at);
CREATE INDEX refresh_tokens_by_user ON refresh_tokens (user_id);

CREATE TABLE revoked_families (
    family     uuid PRIMARY KEY,
    revoked_at bigint NOT NULL
);

CREATE TABLE conversations (
    id            uuid PRIMARY KEY,
    user_id       uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    title         text NOT NULL,
    model         text NOT NULL,
    created_at    bigint NOT NULL,
    updated_at    bigint NOT NULL,
    message_count integer NOT NULL
);
CREATE INDEX conversations_by_user ON conversations (user_id, updated_at, id);

CREATE TABLE messages (
    conversation_id uuid NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    seq             integer NOT NULL,
    id              uuid NOT NULL,
    role            text NOT NULL,
    content         text NOT NULL,
    tool_calls      jsonb,
    tool_call_id    text,
    model           text,
    provider        text,
    created_at      bigint NOT NULL,
    usage           jsonb,
    PRIMARY KEY (conversation_id, seq)
);

CREATE TABLE jobs (
    id          uuid PRIMARY KEY,
    user_id     uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    state       text NOT NULL
                CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    attempts    integer NOT NULL,
    request     jsonb NOT NULL,
    result      jsonb,
    error       text,
    created_at  bigint NOT NULL,
    started_at  bigint,
    finished_at bigint,
    run_at      bigint NOT NULL,
    lease_until bigint
);
-- Claiming takes the queued job due first; rescue scans expired leases; retention and the
-- admin view read finished jobs by time; a user's listing is newest first.
CREATE INDEX jobs_queued ON jobs (run_at, id) WHERE state = 'queued';
CREATE INDEX jobs_running ON jobs (lease_until, id) WHERE state = 'running';
CREATE INDEX jobs_finished ON jobs (finished_at, id)
    WHERE state IN ('succeeded', 'failed', 'cancelled');
CREATE INDEX jobs_by_user ON jobs (user_id, id);
