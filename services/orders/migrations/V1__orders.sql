-- Orders and their line items. Ids are UUIDv7, so ordering by id is ordering by creation
-- time, which makes "newest first" pages a plain index range scan.
CREATE TABLE orders.orders (
    id               uuid        PRIMARY KEY,
    customer_id      text        NOT NULL,
    delivery_address text        NOT NULL,
    status           text        NOT NULL CHECK (status IN ('PENDING', 'CONFIRMED', 'CANCELLED')),
    cancel_reason    text        NOT NULL DEFAULT '',
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX orders_by_customer ON orders.orders (customer_id, id DESC);

CREATE TABLE orders.order_items (
    order_id uuid     NOT NULL REFERENCES orders.orders (id) ON DELETE CASCADE,
    line_no  smallint NOT NULL,
    sku      text     NOT NULL,
    quantity integer  NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (order_id, line_no)
);
