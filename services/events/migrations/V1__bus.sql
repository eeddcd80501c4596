-- The Postgres event bus, and the dead letters of both buses.
--
-- A relay moves an outbox row into `messages` and, in the same transaction, one `deliveries`
-- row per subscription of its topic (fan-out at publish time). A consumer claims its due
-- deliveries, handles them, and deletes them; a message whose last delivery is gone is
-- deleted too. Deliveries that run out of attempts move to `dead_letters`.

CREATE TABLE bus.messages (
    seq          bigserial   PRIMARY KEY,
    event_id     uuid        NOT NULL UNIQUE,
    topic        text        NOT NULL,
    key          text        NOT NULL,
    payload      bytea       NOT NULL,
    headers      jsonb       NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL,
    published_at timestamptz NOT NULL DEFAULT now()
);

-- Which subscription wants which topic; a consumer registers its rows when it starts.
CREATE TABLE bus.subscriptions (
    name       text        NOT NULL,
    topic      text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, topic)
);

CREATE INDEX subscriptions_by_topic ON bus.subscriptions (topic);

-- One row per (subscription, message) until the subscription's consumer has handled it.
-- `attempts` counts claims; a claim moves `next_attempt_at` forward by the lease (the ack
-- wait), so a consumer that dies mid-event gives the delivery back when the lease ends.
CREATE TABLE bus.deliveries (
    subscription    text        NOT NULL,
    seq             bigint      NOT NULL REFERENCES bus.messages (seq) ON DELETE CASCADE,
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_error      text,
    PRIMARY KEY (subscription, seq)
);

CREATE INDEX deliveries_due ON bus.deliveries (subscription, next_attempt_at);
-- The foreign key's cascade and the "is this message fully delivered" check look up by seq.
CREATE INDEX deliveries_by_seq ON bus.deliveries (seq);

-- Events a subscription gave up on, from either bus, with a copy of the envelope so a replay
-- does not depend on the bus still holding the message.
CREATE TABLE bus.dead_letters (
    subscription text        NOT NULL,
    event_id     uuid        NOT NULL,
    topic        text        NOT NULL,
    key          text        NOT NULL,
    payload      bytea       NOT NULL,
    headers      jsonb       NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL,
    attempts     integer     NOT NULL,
    last_error   text        NOT NULL,
    dead_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subscription, event_id)
);

CREATE INDEX dead_letters_by_time ON bus.dead_letters (dead_at);
