-- Leadership of a cluster-wide role (the scheduler): one holder at a time under a
-- lease; `term` grows with every change of holder (the fencing token).
CREATE TABLE leaders (
    role       text PRIMARY KEY,
    holder     text NOT NULL,
    term       bigint NOT NULL,
    expires_at timestamptz NOT NULL
);
