-- Every assignment and every finished delivery updates its courier's `active`. With `active`
-- in an index (V1's (zone, active)), none of those updates could be HOT: each wrote a new
-- entry in both of the table's indexes, and the pick read through the zone's dead entries
-- (5,829 index entries for 200 couriers after 5,629 assignments; not one HOT update). Indexed
-- by zone alone, an update changes no indexed column; with free room on each page
-- (fillfactor 50: a few hundred couriers fit in a few dozen pages) the new row version stays
-- on its page, and old versions are pruned as pages are read, without vacuum. The pick still
-- reads the zone's live couriers and sorts them by load.
ALTER TABLE delivery.couriers SET (fillfactor = 50);
CREATE INDEX couriers_in_zone ON delivery.couriers (zone);
DROP INDEX delivery.couriers_by_zone;
-- The fillfactor applies to pages written from now on: rewrite the existing ones so that an
-- upgraded installation's couriers get their room too (a small table; brief exclusive lock).
CLUSTER delivery.couriers USING couriers_pkey;
