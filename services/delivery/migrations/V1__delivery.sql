-- Couriers, the deliveries they carry, each delivery's history, and the outbox of events.
--
-- `couriers.active` is the number of deliveries a courier carries now; assignment and the
-- end of a delivery change it in the same transaction as the delivery row, so it never
-- drifts from the deliveries table. It may exceed `capacity` only after capacity was
-- lowered (PutCourier), never by an assignment.
CREATE TABLE delivery.couriers (
    id         text        PRIMARY KEY,
    name       text        NOT NULL DEFAULT '',
    zone       text        NOT NULL,
    capacity   integer     NOT NULL CHECK (capacity BETWEEN 1 AND 1000),
    active     integer     NOT NULL DEFAULT 0 CHECK (active >= 0),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- AssignCourier looks for the least loaded courier of a zone.
CREATE INDEX couriers_by_zone ON delivery.couriers (zone, active);

-- One row per order: the order id is the key, so concurrent assignments for one order
-- cannot create two deliveries. A cancellation recorded before any assignment is a
-- CANCELLED row without a courier (a tombstone), so a late assignment is refused.
CREATE TABLE delivery.deliveries (
    order_id    uuid        PRIMARY KEY,
    customer_id text        NOT NULL DEFAULT '',
    courier_id  text        REFERENCES delivery.couriers (id),
    zone        text        NOT NULL DEFAULT '',
    status      text        NOT NULL CHECK (status IN
                    ('ASSIGNED', 'PICKED_UP', 'IN_TRANSIT', 'DELIVERED', 'FAILED', 'CANCELLED')),
    lat         double precision CHECK (lat BETWEEN -90 AND 90),
    lng         double precision CHECK (lng BETWEEN -180 AND 180),
    reason      text        NOT NULL DEFAULT '',
    version     bigint      NOT NULL CHECK (version >= 1),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CHECK ((lat IS NULL) = (lng IS NULL))
);

-- Every change of a delivery appends one row, numbered by the delivery's version after the
-- change; watchers replay it to send every change in order. The location is the one
-- reported with the change, if any.
CREATE TABLE delivery.tracking_events (
    order_id uuid             NOT NULL REFERENCES delivery.deliveries (order_id) ON DELETE CASCADE,
    version  bigint           NOT NULL,
    status   text             NOT NULL,
    lat      double precision,
    lng      double precision,
    at       timestamptz      NOT NULL DEFAULT now(),
    PRIMARY KEY (order_id, version)
);

-- The transactional outbox: events written with the state change they describe, published
-- by the events relay (waybill_events::OUTBOX_TABLE_SQL).
CREATE TABLE delivery.outbox (
    id         uuid        PRIMARY KEY,
    topic      text        NOT NULL,
    key        text        NOT NULL,
    payload    bytea       NOT NULL,
    headers    jsonb       NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now()
);
