-- Prompt templates (issue 10): the finance projection records which template and version built a
-- model call, so cost can be grouped by prompt version (`group_by=prompt`).
ALTER TABLE finance_fact
    ADD COLUMN prompt_id text,
    ADD COLUMN prompt_version integer;
CREATE INDEX finance_fact_prompt ON finance_fact (prompt_id, prompt_version) WHERE prompt_id IS NOT NULL;
