-- A keyed PlaceOrder's key (a digest of caller, method and key, from mesh-layer's KeyId), so
-- that a repeat the idempotency layer let through after all (its claim released when the
-- database did not confirm a commit, or past its retention) finds the first call's order
-- instead of placing a second. Unkeyed orders have none.
--
-- A nullable column without a default changes only the catalog, but it needs the table's
-- exclusive lock for that moment: give up rather than queue behind a long transaction with
-- every call on orders queued behind this. The index comes in V5, in its own transaction.
SET LOCAL lock_timeout = '5s';
ALTER TABLE orders.orders ADD COLUMN placement_key bytea;
