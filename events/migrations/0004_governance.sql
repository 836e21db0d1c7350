-- Escalations (issue 8): a policy refused a call with `escalation_required`; the data plane emitted a
-- `policy.decision` event (outcome "escalate") and the ledger projector folds it here, once per
-- escalation id. An admin approves (which also writes an `escalation` grant config entity that lets
-- the key retry once with `Alephant-Escalation-Id` until `expires_at`) or rejects it.
CREATE TABLE escalation (
    id            text        PRIMARY KEY,
    event_id      uuid        NOT NULL,
    workspace_id  text        NOT NULL,
    key_id        text,
    agent_id      text,
    run_id        text,
    request_id    text,
    rule          text        NOT NULL,
    scope         text        NOT NULL DEFAULT '',
    scope_id      text        NOT NULL DEFAULT '',
    model         text        NOT NULL DEFAULT '',
    endpoint      text        NOT NULL DEFAULT '',
    message       text        NOT NULL DEFAULT '',
    status        text        NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'approved', 'rejected', 'used')),
    created_at    timestamptz NOT NULL,
    decided_at    timestamptz,
    decided_by    text,
    -- When an approved escalation's grant stops admitting the retry.
    expires_at    timestamptz
);
CREATE INDEX escalation_ws_status ON escalation (workspace_id, status, created_at);
