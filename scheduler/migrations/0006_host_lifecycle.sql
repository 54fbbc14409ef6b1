-- The autoscaler's states: a drained, empty host being removed by its provider, and one
-- that is gone.
ALTER TABLE hosts DROP CONSTRAINT hosts_state_check;
ALTER TABLE hosts ADD CONSTRAINT hosts_state_check
    CHECK (state IN ('ready', 'cordoned', 'draining', 'terminating', 'gone'));
