-- Idempotency-Key records for admin POSTs (controlplane/idempotency.py).
-- One row per (route, key). `token` identifies the request that claimed it; `status` is NULL while
-- that request is in flight. The response is Fernet ciphertext (it may hold a new virtual key's
-- plaintext), and `request_hash` is an HMAC under the master secret, so neither reveals a secret.
CREATE TABLE admin_idempotency (
    route         text        NOT NULL,
    key           text        NOT NULL,
    request_hash  text        NOT NULL,
    token         uuid        NOT NULL,
    status        smallint,
    response      text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL DEFAULT now() + interval '24 hours',
    PRIMARY KEY (route, key)
);
CREATE INDEX admin_idempotency_expiry ON admin_idempotency (expires_at);
