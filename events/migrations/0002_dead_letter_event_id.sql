-- Poison isolation: a decoded event the journal cannot store is dead-lettered with its event id
-- (NULL when the message did not decode) and the reason in `error`, so finance and operators can
-- find the call that was refused and why.
ALTER TABLE dead_letter ADD COLUMN event_id uuid;
CREATE INDEX dead_letter_event ON dead_letter (event_id) WHERE event_id IS NOT NULL;
