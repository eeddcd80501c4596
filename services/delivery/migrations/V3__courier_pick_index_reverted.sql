-- V2's (zone, active, id) index made the pick slower, not faster: every assignment changes
-- `active`, so every update adds an entry to that index, and the entries of the old row
-- versions sort first (their `active` was lower). The pick then walked thousands of dead
-- entries before the first live courier (2,634 buffers, 0.4–0.6 ms, after 3,000 assignments
-- over 200 couriers), where sorting the zone's live rows costs 0.2 ms. Back to V1's index.
CREATE INDEX couriers_by_zone ON delivery.couriers (zone, active);
DROP INDEX delivery.couriers_pick;
