-- Executing a command updates its row at least twice (claimed, then finished; a retry twice
-- more). None of those updates could be HOT: `status` appeared in the predicates of all four
-- partial indexes and `updated_at` was a key of two, so each update wrote a new entry into
-- every index whose predicate held (five for a claim) and left the old ones for vacuum.
--
-- Now the indexes name only `phase`, a stored column generated from `status` that changes
-- only when a command leaves or re-enters the queue, and `closed_at`, set when it does. A
-- claim (ACCEPTED → RUNNING) and a retry (RUNNING → RETRYING → RUNNING) change neither, so
-- they are HOT when the page has room: the fillfactor keeps half of each page free for the
-- new versions of the rows a claim takes together (a batch claims neighbouring rows).
--
-- Upgrading: adding a stored generated column rewrites the table (at fillfactor 50, twice its
-- former size) under an exclusive lock, and the indexes are rebuilt, all in this migration's
-- transaction: commands wait for it. Processes of the previous version that still run during
-- a rolling upgrade finish commands without setting closed_at (retention falls back on
-- updated_at for those) and filter on status, which no index serves any more, until they are
-- replaced.
ALTER TABLE commands.commands SET (fillfactor = 50);

ALTER TABLE commands.commands
    ADD COLUMN phase text NOT NULL GENERATED ALWAYS AS (
        CASE WHEN status IN ('ACCEPTED', 'RUNNING', 'RETRYING') THEN 'open'
             WHEN status = 'DEAD' THEN 'dead'
             ELSE 'closed' END) STORED,
    -- When the command last left the queue (finished, died or was cancelled); NULL while open.
    ADD COLUMN closed_at timestamptz;

UPDATE commands.commands SET closed_at = updated_at WHERE phase <> 'open';

DROP INDEX commands.commands_open;
DROP INDEX commands.commands_ready;
DROP INDEX commands.commands_dead;
DROP INDEX commands.commands_finished;

-- Work to claim, in submission order, and the "is an earlier command of this user still
-- open?" probe that keeps one user's commands in order.
CREATE INDEX commands_open ON commands.commands (user_id, seq) WHERE phase = 'open';
CREATE INDEX commands_ready ON commands.commands (seq) WHERE phase = 'open';
-- ListDeadCommands pages by id.
CREATE INDEX commands_dead ON commands.commands (id) WHERE phase = 'dead';
-- Retention: finished commands by when they finished.
CREATE INDEX commands_finished ON commands.commands (closed_at) WHERE phase = 'closed';

-- The planner has no statistics on the new column until autovacuum gets to it.
ANALYZE commands.commands;
