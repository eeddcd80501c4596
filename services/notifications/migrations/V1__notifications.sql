-- One notification per customer and event: the unique key is what makes a redelivered event
-- harmless even before the inbox is consulted.
CREATE TABLE notifications.notifications (
    id          uuid        PRIMARY KEY,
    customer_id text        NOT NULL,
    order_id    uuid        NOT NULL,
    kind        text        NOT NULL,
    message     text        NOT NULL,
    event_id    uuid        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (event_id, customer_id)
);

CREATE INDEX notifications_by_customer ON notifications.notifications (customer_id, id DESC);

-- The events this service has handled (waybill_events::INBOX_TABLE_SQL).
CREATE TABLE notifications.inbox (
    subscription text        NOT NULL,
    event_id     uuid        NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subscription, event_id)
);
