-- Run and session timelines (issue 13): GET /admin/v1/runs/{id}/timeline and
-- GET /admin/v1/sessions/{id} read one run's or session's events from the journal, in
-- (occurred_at, event_id) order, and the session's finance sums.
-- The journal keys the first 256 characters of the id (at most 1 KiB of UTF-8): a session id is
-- whatever header a client sent, and an index row past Postgres's limit would refuse the event
-- (the projector would dead-letter it). The query compares the full id on the rows found.
CREATE INDEX event_journal_run ON event_journal
    (left(body->>'run_id', 256), workspace_id, occurred_at, event_id) WHERE body->>'run_id' IS NOT NULL;
CREATE INDEX event_journal_session ON event_journal
    (left(body->>'session_id', 256), workspace_id, occurred_at, event_id) WHERE body->>'session_id' IS NOT NULL;
-- finance_fact.session_id is already bounded (events.ledger.bounded) by the projection.
CREATE INDEX finance_fact_session ON finance_fact (session_id, workspace_id) WHERE session_id IS NOT NULL;
