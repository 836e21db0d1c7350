-- Config state: one row per entity, the source the KV snapshot is published from.
CREATE TABLE config_entity (
    kind          text        NOT NULL,
    id            text        NOT NULL,
    workspace_id  text,
    kv_key        text        NOT NULL UNIQUE,
    body          jsonb       NOT NULL,
    deleted_at    timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (kind, id)
);
CREATE INDEX config_entity_ws ON config_entity (workspace_id, kind);

-- Transactional outbox: written with the state change, published to JetStream + KV after commit.
CREATE TABLE config_outbox (
    seq           bigserial   UNIQUE,
    event_id      uuid        PRIMARY KEY,
    subject       text        NOT NULL,
    event         bytea       NOT NULL,
    kv_key        text        NOT NULL,
    kv_value      bytea,                 -- NULL means delete the key
    created_at    timestamptz NOT NULL DEFAULT now(),
    published_at  timestamptz
);
CREATE INDEX config_outbox_pending ON config_outbox (seq) WHERE published_at IS NULL;

-- Projector bookkeeping: the checkpoint is written in the same transaction as the rows.
CREATE TABLE projector_checkpoint (
    projector   text        PRIMARY KEY,
    stream      text        NOT NULL,
    last_seq    bigint      NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Append-only journal; the event id is the idempotency anchor (= Nats-Msg-Id).
CREATE TABLE event_journal (
    event_id           uuid        PRIMARY KEY,
    stream_seq         bigint      NOT NULL,
    type               text        NOT NULL,
    workspace_id       text        NOT NULL,
    occurred_at        timestamptz NOT NULL,
    snapshot_revision  bigint      NOT NULL DEFAULT 0,
    body               jsonb       NOT NULL
);
CREATE INDEX event_journal_type ON event_journal (workspace_id, type, occurred_at);

-- Double-entry ledger in integer nano-units. Transfers are immutable.
CREATE TABLE ledger_account (
    id              text          PRIMARY KEY,
    currency        text          NOT NULL,
    debits_posted   numeric(38,0) NOT NULL DEFAULT 0,
    credits_posted  numeric(38,0) NOT NULL DEFAULT 0
);

CREATE TABLE ledger_transfer (
    id                 uuid          PRIMARY KEY,
    event_id           uuid          NOT NULL REFERENCES event_journal (event_id),
    leg                smallint      NOT NULL,
    debit_account_id   text          NOT NULL REFERENCES ledger_account (id),
    credit_account_id  text          NOT NULL REFERENCES ledger_account (id),
    amount             numeric(38,0) NOT NULL CHECK (amount > 0),
    currency           text          NOT NULL,
    code               text          NOT NULL,
    workspace_id       text          NOT NULL,
    run_id             text,
    created_at         timestamptz   NOT NULL,
    UNIQUE (event_id, leg),
    CHECK (debit_account_id <> credit_account_id)
);
CREATE INDEX ledger_transfer_run ON ledger_transfer (workspace_id, run_id);

CREATE FUNCTION ledger_transfer_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger_transfer rows are immutable; post a correcting transfer instead';
END $$;
CREATE TRIGGER ledger_transfer_no_update BEFORE UPDATE OR DELETE ON ledger_transfer
    FOR EACH ROW EXECUTE FUNCTION ledger_transfer_immutable();

-- Read model: per-run usage and cost.
CREATE TABLE run_usage (
    workspace_id   text          NOT NULL,
    run_id         text          NOT NULL,
    requests       bigint        NOT NULL DEFAULT 0,
    errors         bigint        NOT NULL DEFAULT 0,
    input_tokens   bigint        NOT NULL DEFAULT 0,
    output_tokens  bigint        NOT NULL DEFAULT 0,
    cost_nanos     numeric(38,0) NOT NULL DEFAULT 0,
    agents         text[]        NOT NULL DEFAULT '{}',
    first_at       timestamptz   NOT NULL,
    last_at        timestamptz   NOT NULL,
    PRIMARY KEY (workspace_id, run_id)
);

-- Messages a projector could not decode: kept for inspection, never silently dropped.
CREATE TABLE dead_letter (
    stream       text        NOT NULL,
    stream_seq   bigint      NOT NULL,
    subject      text        NOT NULL,
    body         bytea       NOT NULL,
    error        text        NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, stream_seq)
);
