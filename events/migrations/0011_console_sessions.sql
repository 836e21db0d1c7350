-- Console sign-ins (controlplane/console/auth.py): the cookie carries a random session token,
-- the table only its SHA-256; `csrf` is the token every form of the session posts back; `actor`
-- is the name given at sign-in, written into the config events the session's actions cause.
CREATE TABLE console_session (
    token_hash text PRIMARY KEY,
    actor text NOT NULL,
    csrf text NOT NULL,
    flash text,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);
CREATE INDEX console_session_expiry ON console_session (expires_at);
