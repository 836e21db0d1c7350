-- Paid endpoints (issue 12): refunds owed to payers (a streamed call settled upfront whose answer
-- failed, the unmetered rest of a per-token authorization) are a finance fact of their own, so a
-- paid endpoint and a run show what they owe back beside what they earned.
ALTER TABLE finance_fact
    ADD COLUMN refunds_due_nanos numeric(38,0) NOT NULL DEFAULT 0;
