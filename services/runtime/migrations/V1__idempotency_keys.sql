-- mesh-layer idempotency keys: one row per (caller, method, key) while a keyed call runs or
-- until its stored outcome expires.
CREATE TABLE mesh.idempotency_keys (
    caller      text        NOT NULL,
    method      text        NOT NULL,
    key         text        NOT NULL,
    fingerprint bytea       NOT NULL,
    state       text        NOT NULL CHECK (state IN ('running', 'done')),
    lease_until timestamptz,
    code        integer,
    message     text,
    details     bytea,
    body        bytea,
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (caller, method, key)
);

CREATE INDEX idempotency_keys_expiry ON mesh.idempotency_keys (expires_at);
