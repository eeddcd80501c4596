-- A keyed PlaceOrder's key (a digest of caller, method and key, from mesh-layer's KeyId), so
-- that a repeat the idempotency layer let through after all (its claim released when the
-- database did not confirm a commit, or past its retention) finds the first call's order
-- instead of placing a second. Unkeyed orders have none and stay out of the index.
ALTER TABLE orders.orders ADD COLUMN placement_key bytea;
CREATE UNIQUE INDEX orders_placement_key ON orders.orders (placement_key)
    WHERE placement_key IS NOT NULL;
