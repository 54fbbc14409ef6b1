-- The system of record: executions, their event logs, policies and the counters the
-- platform reads without scanning. Applied by `PgStore::connect` (sqlx migrations).
--
-- What a user produced is sealed (AES-256-GCM, the platform's keyring) before it gets
-- here: `executions.record` is the sealed record, `events.body` each sealed event. The
-- plain columns are what queries need: owner, tab, state, order.

CREATE TABLE executions (
    id          text PRIMARY KEY,
    org         text NOT NULL,
    usr         text NOT NULL,
    tab_id      text,
    state       text NOT NULL,
    cancel      text,
    -- The order admission assigned: "oldest" means the smallest, whatever any node's
    -- clock said.
    admitted    bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    created_at  bigint NOT NULL,
    finished_at bigint,
    -- The seq of the last event: the log's counter, bumped in the appending transaction
    -- (a database sequence would leave gaps on rollback).
    last_seq    bigint NOT NULL,
    record      bytea NOT NULL
);

-- What counts against a user's parallelism cap, in admission order.
CREATE INDEX executions_active_by_user ON executions (org, usr, admitted)
    WHERE state IN ('queued', 'running') AND cancel IS NULL;

-- R10 as an invariant: one active execution per tab.
CREATE UNIQUE INDEX executions_one_active_per_tab ON executions (org, usr, tab_id)
    WHERE tab_id IS NOT NULL AND state IN ('queued', 'running') AND cancel IS NULL;

CREATE INDEX executions_newest ON executions (created_at DESC, id DESC);
CREATE INDEX executions_by_user_newest ON executions (org, usr, created_at DESC, id DESC);
CREATE INDEX executions_finished ON executions (finished_at)
    WHERE state NOT IN ('queued', 'running');

CREATE TABLE events (
    execution_id text NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
    seq          bigint NOT NULL,
    body         bytea NOT NULL,
    PRIMARY KEY (execution_id, seq)
);

CREATE TABLE org_policies (
    org    text PRIMARY KEY,
    policy jsonb NOT NULL
);

CREATE TABLE user_policies (
    org    text NOT NULL,
    usr    text NOT NULL,
    policy jsonb NOT NULL,
    PRIMARY KEY (org, usr)
);

-- Queued and running executions platform-wide, kept in every state-changing
-- transaction: the queue limit and the /metrics gauges read them, never a scan.
CREATE TABLE counters (
    name  text PRIMARY KEY,
    value bigint NOT NULL CHECK (value >= 0)
);
INSERT INTO counters (name, value) VALUES ('queued', 0), ('running', 0);
