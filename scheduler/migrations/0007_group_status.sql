-- What the leading scheduler's autoscaler last saw of each host group (pending demand,
-- room kept for active users, hosts on their way or being removed): read by every API
-- replica, /metrics and the monitor without scanning the executions.
CREATE TABLE group_status (
    grp    text PRIMARY KEY,
    status jsonb NOT NULL
);
