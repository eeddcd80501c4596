-- The audit table is appended to three times per command (accepted, running, finished) and
-- read only by command (audit_by_command, which also orders by id). Its primary key index
-- was never used by a query but was written on every append; ids stay unique, as an identity
-- column only this table's inserts draw from.
ALTER TABLE commands.audit DROP CONSTRAINT audit_pkey;
