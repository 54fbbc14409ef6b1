-- Host leases: an agent renews its lease on every heartbeat (the database's clock); a
-- lapsed host's running executions are declared lost and the host must register anew.
CREATE TABLE hosts (
    agent      text PRIMARY KEY,
    expires_at timestamptz NOT NULL,
    alive      boolean NOT NULL
);

-- The agent running an execution, to find a lapsed host's runs.
ALTER TABLE executions ADD COLUMN agent text;
CREATE INDEX executions_running_by_agent ON executions (agent) WHERE state = 'running';
