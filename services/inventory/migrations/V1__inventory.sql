-- The catalog and its stock. `reserved` counts units held by HELD reservations; the CHECKs
-- are the last line of defence for "stock never goes negative": whatever the code does, the
-- database refuses a row with more reserved than on hand.
CREATE TABLE inventory.items (
    sku        text        PRIMARY KEY,
    name       text        NOT NULL DEFAULT '',
    on_hand    integer     NOT NULL CHECK (on_hand >= 0),
    reserved   integer     NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    updated_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT reserved_within_on_hand CHECK (reserved <= on_hand)
);

-- One reservation per order: the primary key is what makes Reserve idempotent per order.
-- A RELEASED row without lines is a tombstone: a release that arrived before its reserve.
CREATE TABLE inventory.reservations (
    order_id   uuid        PRIMARY KEY,
    state      text        NOT NULL CHECK (state IN ('HELD', 'COMMITTED', 'RELEASED')),
    expires_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX reservations_expiring ON inventory.reservations (expires_at) WHERE state = 'HELD';

CREATE TABLE inventory.reservation_lines (
    order_id uuid    NOT NULL REFERENCES inventory.reservations (order_id) ON DELETE CASCADE,
    sku      text    NOT NULL REFERENCES inventory.items (sku),
    quantity integer NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (order_id, sku)
);
