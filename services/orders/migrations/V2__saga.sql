-- PlaceOrder's saga: reserve stock -> assign a courier -> commit stock -> confirm.
ALTER TABLE orders.orders
    ADD COLUMN zone       text NOT NULL DEFAULT 'default',
    ADD COLUMN courier_id text NOT NULL DEFAULT '';

-- The durable state of each order's saga. Every remote step is idempotent per order (the
-- reservation and the delivery are keyed by the order id), so going FORWARD needs no record
-- of which steps are done: a resumed saga runs them again and each returns what it did the
-- first time. What must be durable is the direction: once a saga turns to COMPENSATE (a
-- step failed for good, or the customer cancelled), it never goes forward again.
--
-- `due_at` is both the lease of the orchestrator running the saga and the time of the next
-- attempt after a transient failure: a saga whose due_at has passed is claimed by whichever
-- orchestrator looks first (FOR UPDATE SKIP LOCKED), so a killed orchestrator's sagas resume.
CREATE TABLE orders.sagas (
    order_id   uuid        PRIMARY KEY REFERENCES orders.orders (id) ON DELETE CASCADE,
    phase      text        NOT NULL CHECK (phase IN ('FORWARD', 'COMPENSATE', 'DONE')),
    reason     text        NOT NULL DEFAULT '',
    step       text        NOT NULL DEFAULT '',
    attempts   integer     NOT NULL DEFAULT 0,
    last_error text        NOT NULL DEFAULT '',
    due_at     timestamptz NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX sagas_due ON orders.sagas (due_at) WHERE phase <> 'DONE';

-- Events leave the service only through this table, written in the same transaction as the
-- state change; the relay publishes them (waybill_events::OUTBOX_TABLE_SQL).
CREATE TABLE orders.outbox (
    id         uuid        PRIMARY KEY,
    topic      text        NOT NULL,
    key        text        NOT NULL,
    payload    bytea       NOT NULL,
    headers    jsonb       NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now()
);
