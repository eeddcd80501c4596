-- The command log, sharded by user: `shard` is a stable hash of user_id modulo the shard count
-- (commands.settings, fixed at first start). A shard is the unit of ordering and of worker
-- ownership (--command-worker-shards). It is a column, not a partition per shard: measured
-- with 16 partitions, every claim and every batch update planned in ~30 ms, locked all 16
-- partitions and their indexes, and joined by scanning every partition, while the same
-- statements on one table use the primary key. Placing shard groups in separate databases is
-- the step that scales past one primary; the column is what that step would route by.
CREATE TABLE commands.settings (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    shard_count integer NOT NULL CHECK (shard_count BETWEEN 1 AND 1024)
);

-- Submission order across the whole log: one user's commands run in `seq` order. A sequence,
-- not the UUID, because UUIDv7s made in one millisecond by different processes do not sort
-- in the order they were stored.
CREATE SEQUENCE commands.submission_seq;

CREATE TABLE commands.commands (
    shard           integer     NOT NULL,
    id              uuid        NOT NULL,
    seq             bigint      NOT NULL DEFAULT nextval('commands.submission_seq'),
    user_id         text        NOT NULL,
    idempotency_key text        NOT NULL,
    kind            text        NOT NULL,
    -- The waybill.commands.v1.CommandPayload encoding: the API's own type, no second format.
    payload         bytea       NOT NULL,
    status          text        NOT NULL CHECK (status IN
                        ('ACCEPTED', 'RUNNING', 'SUCCEEDED', 'RETRYING', 'DEAD', 'CANCELLED', 'UNDONE')),
    attempts        integer     NOT NULL DEFAULT 0,
    run_after       timestamptz NOT NULL DEFAULT now(),
    -- While RUNNING: the worker and how long its claim holds. A claim past its lease may be
    -- taken over: the worker is presumed dead.
    worker          text        NOT NULL DEFAULT '',
    lease_until     timestamptz,
    result          text        NOT NULL DEFAULT '',
    last_error      text        NOT NULL DEFAULT '',
    undo_of         uuid,
    -- The W3C traceparent of the SubmitCommand call: each attempt's trace links back to it.
    traceparent     text        NOT NULL DEFAULT '',
    undone_by       uuid,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (id),
    -- What makes SubmitCommand idempotent.
    UNIQUE (user_id, idempotency_key)
);

-- Work to claim, in submission order; also the "is an earlier command of this user still
-- open?" probe that keeps one user's commands in order.
CREATE INDEX commands_open ON commands.commands (user_id, seq)
    WHERE status IN ('ACCEPTED', 'RUNNING', 'RETRYING');
CREATE INDEX commands_ready ON commands.commands (seq)
    WHERE status IN ('ACCEPTED', 'RUNNING', 'RETRYING');
-- ListCommands: a user's commands, newest first.
CREATE INDEX commands_by_user ON commands.commands (user_id, id DESC);
CREATE INDEX commands_dead ON commands.commands (updated_at, id) WHERE status = 'DEAD';
CREATE INDEX commands_finished ON commands.commands (updated_at)
    WHERE status IN ('SUCCEEDED', 'CANCELLED', 'UNDONE');

-- Every status change, appended, never updated.
CREATE TABLE commands.audit (
    id         bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    command_id uuid        NOT NULL,
    status     text        NOT NULL CHECK (status IN
                   ('ACCEPTED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'RETRYING', 'DEAD', 'CANCELLED', 'UNDONE')),
    attempt    integer     NOT NULL,
    worker     text        NOT NULL DEFAULT '',
    error      text        NOT NULL DEFAULT '',
    at         timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX audit_by_command ON commands.audit (command_id, id);
