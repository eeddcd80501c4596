-- A user's commands run one at a time, in submission order, so every open command but the
-- user's oldest is blocked. The claim scan walks the open commands in submission order and
-- probes each for an older open command of its user: with deep per-user queues (100 users
-- with 300 queued commands each) every claim walked all 30,000 of them to find at most 100,
-- 140–200 ms per claim, and one user's bulk submission slowed the claims of everyone else.
--
-- `blocked` marks an open command found waiting behind an older one of its user; the scan
-- index leaves it out. The claim scan sets it (on the commands it walked past), and whatever
-- takes a command out of the queue clears it on the user's next open command, in the same
-- transaction (CommandStore::release_heads). A new command starts unblocked, so ingestion
-- reads nothing of the user's queue; a command marked by mistake can only be delayed: a sweep
-- releases any blocked command that is its user's oldest open one (and counts it).
--
-- Upgrading: adding a column with a constant default does not rewrite the table, but it and
-- the index swap take an exclusive lock until this migration commits (reads of the table wait
-- too) while the new index reads the open commands. Processes of the previous version still
-- claim by the old rule during a rolling upgrade, and slower: their walk cannot use the new
-- index and scans `commands_open` and sorts. They never mark or release; the sweep releases
-- what they leave blocked.
ALTER TABLE commands.commands ADD COLUMN blocked boolean NOT NULL DEFAULT false;

DROP INDEX commands.commands_ready;
CREATE INDEX commands_ready ON commands.commands (seq) WHERE phase = 'open' AND NOT blocked;
