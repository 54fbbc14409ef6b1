-- The two writes on the way from a POST to the sandbox, each in one round trip.
--
-- Marking an execution running no longer rewrites its sealed record: the start is kept
-- in plain columns (state, agent, started_at), which a reader lays over a record still
-- sealed as queued. The next full write of the record (its end, a cancel) seals them in.
ALTER TABLE executions ADD COLUMN started_at bigint;

-- Every change of a policy moves this counter (in the same statement), so that an API
-- node may admit with policies it read earlier: admission checks the version they were
-- read at, and refuses ('stale_policy') when they changed since.
INSERT INTO counters (name, value) VALUES ('policies', 0);

-- Admission when it cancels nothing: the user's advisory lock, the checks, the row, its
-- `queued` event and the queue counter in one call. `outcome` is
--   'admitted'   (value = the admission order),
--   'queue_full' (value = the queued count; nothing stored),
--   'stale_policy' (p_policies is not NULL and the policies changed since that version;
--                 nothing stored: the caller reads them again), or
--   'decide'     (nothing stored: the id exists, the tab has an active execution, or the
--                 user is at the cap; the caller runs the full admission, which decides).
-- The same lock, the same order of row locks (the user's rows, then the counter) as the
-- full admission, so the two serialise per user exactly alike.
CREATE FUNCTION hatchery_admit_simple(
    p_id text, p_org text, p_usr text, p_tab text, p_created bigint, p_record bytea,
    p_event bytea, p_max_parallel bigint, p_max_queued bigint, p_policies bigint,
    OUT outcome text, OUT value bigint)
LANGUAGE plpgsql AS $$
DECLARE
    active bigint;
    tab_taken boolean;
    queued bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(hashtext(p_org), hashtext(p_usr));
    IF p_policies IS NOT NULL
       AND (SELECT c.value FROM counters c WHERE c.name = 'policies') <> p_policies THEN
        outcome := 'stale_policy';
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM executions WHERE id = p_id) THEN
        outcome := 'decide';
        RETURN;
    END IF;
    SELECT count(*), coalesce(bool_or(p_tab IS NOT NULL AND tab_id = p_tab), false)
        INTO active, tab_taken
        FROM (SELECT tab_id FROM executions
              WHERE org = p_org AND usr = p_usr AND state IN ('queued', 'running')
                AND cancel IS NULL
              FOR UPDATE) AS mine;
    IF tab_taken OR active + 1 > p_max_parallel THEN
        outcome := 'decide';
        RETURN;
    END IF;
    SELECT c.value INTO queued FROM counters c WHERE c.name = 'queued' FOR UPDATE;
    IF greatest(queued, 0) >= p_max_queued THEN
        outcome := 'queue_full';
        value := greatest(queued, 0);
        RETURN;
    END IF;
    INSERT INTO executions (id, org, usr, tab_id, state, cancel, created_at, finished_at,
                            last_seq, record)
        VALUES (p_id, p_org, p_usr, p_tab, 'queued', NULL, p_created, NULL, 1, p_record)
        RETURNING admitted INTO value;
    INSERT INTO events (execution_id, seq, body) VALUES (p_id, 1, p_event);
    UPDATE counters SET value = counters.value + 1 WHERE name = 'queued';
    outcome := 'admitted';
END
$$;
