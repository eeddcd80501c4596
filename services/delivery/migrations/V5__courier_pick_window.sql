-- The pick sorted every live courier of the zone by load on each assignment (0.29 ms of a
-- 200-courier zone at 300 orders/s, the most expensive statement of an order), and the cost
-- grows with the zone. Now it takes the least loaded of a few candidates found from a random
-- point of `pick_key`, read through this index: while most couriers have room, a handful of
-- rows whatever the zone's size (full ones are walked past; a zone with none free is still
-- read whole before refusing). The least loaded of a few random couriers keeps loads close
-- to even (the "power of d choices"). `pick_key` never changes, so load updates stay HOT (V4).
ALTER TABLE delivery.couriers ADD COLUMN pick_key double precision NOT NULL DEFAULT random();
CREATE INDEX couriers_by_pick_key ON delivery.couriers (zone, pick_key);
DROP INDEX delivery.couriers_in_zone;
