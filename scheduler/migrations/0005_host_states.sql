-- What a host is asked to do: ready, cordoned (no new work) or draining (no new work,
-- warm pools emptied). Kept across the agent's restarts; read at every heartbeat.
ALTER TABLE hosts ADD COLUMN state text NOT NULL DEFAULT 'ready'
    CHECK (state IN ('ready', 'cordoned', 'draining'));
