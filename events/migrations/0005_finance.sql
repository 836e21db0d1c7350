-- Agent finance (issue 9).
-- 1. Every ledger transfer carries the attribution of the event that posted it and the snapshot
--    revision that priced it.
ALTER TABLE ledger_transfer
    ADD COLUMN agent_id text,
    ADD COLUMN workflow_id text,
    ADD COLUMN session_id text,
    ADD COLUMN snapshot_revision bigint NOT NULL DEFAULT 0;
-- The foreign keys to event_journal and ledger_account go: checking them row by row was about a
-- third of the ledger projector's database time, and the projector writes the journal row and
-- upserts both accounts in the same transaction as each transfer. `alephant ledger reconcile`
-- checks that every transfer's event and accounts exist.
ALTER TABLE ledger_transfer
    DROP CONSTRAINT IF EXISTS ledger_transfer_event_id_fkey,
    DROP CONSTRAINT IF EXISTS ledger_transfer_debit_account_id_fkey,
    DROP CONSTRAINT IF EXISTS ledger_transfer_credit_account_id_fkey;

-- 2. The finance projection (projector "finance"): one row per money-relevant event, its amounts
--    in separate integer nano-unit columns so any grouping is one SUM. Folded idempotently by
--    event id. `kind`: llm | repriced | tool | payment_out | revenue | cache_hit.
--    Dimension values are bounded (events.ledger.bounded) so they fit an index row.
CREATE TABLE finance_fact (
    event_id              uuid          PRIMARY KEY,
    workspace_id          text          NOT NULL,
    occurred_at           timestamptz   NOT NULL,
    kind                  text          NOT NULL,
    currency              text          NOT NULL DEFAULT 'USD',
    agent_id              text,
    run_id                text,
    workflow_id           text,
    session_id            text,
    member_id             text,
    department_id         text,
    key_id                text,
    provider              text,
    model                 text,
    vendor                text,
    tool                  text,
    rail                  text,
    endpoint_id           text,
    requests              integer       NOT NULL DEFAULT 0,
    errors                integer       NOT NULL DEFAULT 0,
    input_tokens          bigint        NOT NULL DEFAULT 0,
    output_tokens         bigint        NOT NULL DEFAULT 0,
    llm_cost_nanos        numeric(38,0) NOT NULL DEFAULT 0,
    tool_cost_nanos       numeric(38,0) NOT NULL DEFAULT 0,
    payments_out_nanos    numeric(38,0) NOT NULL DEFAULT 0,
    revenue_nanos         numeric(38,0) NOT NULL DEFAULT 0,
    cache_savings_nanos   numeric(38,0) NOT NULL DEFAULT 0,
    -- cost of calls whose usage the gateway estimated (the provider reported none)
    estimated_cost_nanos  numeric(38,0) NOT NULL DEFAULT 0,
    -- tokens of calls with no known price (negative on the re-pricing that priced them)
    unpriced_tokens       bigint        NOT NULL DEFAULT 0,
    price_source          text,
    price_id              text,
    properties            jsonb         NOT NULL DEFAULT '{}'
);
CREATE INDEX finance_fact_ws_time ON finance_fact (workspace_id, occurred_at);
CREATE INDEX finance_fact_time ON finance_fact (occurred_at);
CREATE INDEX finance_fact_run ON finance_fact (run_id, workspace_id) WHERE run_id IS NOT NULL;
CREATE INDEX finance_fact_agent ON finance_fact (agent_id, occurred_at) WHERE agent_id IS NOT NULL;
CREATE INDEX finance_fact_workflow ON finance_fact (workflow_id, occurred_at) WHERE workflow_id IS NOT NULL;
CREATE INDEX finance_fact_unpriced ON finance_fact (provider, model) WHERE unpriced_tokens <> 0;

-- 3. Run outcomes (`run.completed`): the latest report wins.
CREATE TABLE run_outcome (
    workspace_id  text        NOT NULL,
    run_id        text        NOT NULL,
    outcome       text        NOT NULL,
    metadata      jsonb       NOT NULL DEFAULT '{}',
    event_id      uuid        NOT NULL,
    completed_at  timestamptz NOT NULL,
    PRIMARY KEY (workspace_id, run_id)
);
