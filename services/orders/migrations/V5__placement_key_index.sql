-- The unique index PlaceOrder's insert relies on (ON CONFLICT (placement_key)). Building it
-- reads the whole table and holds back writes to orders meanwhile (reads go on). Where the
-- table is large, create it beforehand without blocking writes, and this is then a no-op:
--   CREATE UNIQUE INDEX CONCURRENTLY orders_placement_key ON orders.orders (placement_key)
--       WHERE placement_key IS NOT NULL;
CREATE UNIQUE INDEX IF NOT EXISTS orders_placement_key ON orders.orders (placement_key)
    WHERE placement_key IS NOT NULL;
