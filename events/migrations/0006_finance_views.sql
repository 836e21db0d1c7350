-- Finance read models for BI tools (issue 9). Views over the finance projection (finance_fact,
-- run_outcome), so they are always current and need no refresh. Money columns are decimal USD
-- as numeric with 9 decimals (nano-USD * 0.000000001: exact, never float); only USD facts count
-- towards them, while requests, errors and tokens count every fact. cost = llm + tool + payments
-- out; margin = revenue - cost. Days and months are UTC.

-- The run detail query (GET /admin/v1/runs/{id} without ?workspace_id=) finds outcomes by run.
CREATE INDEX run_outcome_run ON run_outcome (run_id);

-- How many hours, days and months the facts span, so the planner estimates the groups of a
-- summary per period (without these it assumes one group per row, sorts every fact instead of
-- hashing them, and never aggregates in parallel: 2-3x slower on a million facts).
CREATE STATISTICS finance_fact_hour ON (date_trunc('hour', occurred_at, 'UTC')) FROM finance_fact;
CREATE STATISTICS finance_fact_day ON (date_trunc('day', occurred_at, 'UTC')) FROM finance_fact;
CREATE STATISTICS finance_fact_month ON (date_trunc('month', occurred_at, 'UTC')) FROM finance_fact;

-- One finance_fact row with its amounts in decimal USD (zero when the fact is in another currency).
CREATE VIEW finance_fact_usd AS
SELECT event_id, workspace_id, occurred_at, kind, currency, agent_id, run_id, workflow_id, session_id, member_id,
       department_id, key_id, provider, model, vendor, tool, rail, endpoint_id, requests, errors, input_tokens,
       output_tokens, unpriced_tokens, properties,
       CASE WHEN currency = 'USD' THEN llm_cost_nanos ELSE 0 END * 0.000000001 AS llm_cost_usd,
       CASE WHEN currency = 'USD' THEN tool_cost_nanos ELSE 0 END * 0.000000001 AS tool_cost_usd,
       CASE WHEN currency = 'USD' THEN payments_out_nanos ELSE 0 END * 0.000000001 AS payments_out_usd,
       CASE WHEN currency = 'USD' THEN llm_cost_nanos + tool_cost_nanos + payments_out_nanos ELSE 0 END
           * 0.000000001 AS cost_usd,
       CASE WHEN currency = 'USD' THEN revenue_nanos ELSE 0 END * 0.000000001 AS revenue_usd,
       CASE WHEN currency = 'USD' THEN revenue_nanos - llm_cost_nanos - tool_cost_nanos - payments_out_nanos ELSE 0 END
           * 0.000000001 AS margin_usd,
       CASE WHEN currency = 'USD' THEN cache_savings_nanos ELSE 0 END * 0.000000001 AS cache_savings_usd,
       CASE WHEN currency = 'USD' THEN estimated_cost_nanos ELSE 0 END * 0.000000001 AS estimated_cost_usd
FROM finance_fact;

-- Per run (workspace_id, run_id): agents, first and last event, totals, and its outcome if reported.
CREATE VIEW finance_by_run AS
SELECT f.workspace_id, f.run_id,
       array_agg(DISTINCT f.agent_id ORDER BY f.agent_id) FILTER (WHERE f.agent_id IS NOT NULL) AS agents,
       min(f.occurred_at) AS first_at, max(f.occurred_at) AS last_at,
       sum(f.requests) AS requests, sum(f.errors) AS errors, sum(f.input_tokens) AS input_tokens,
       sum(f.output_tokens) AS output_tokens, sum(f.unpriced_tokens) AS unpriced_tokens,
       sum(f.llm_cost_usd) AS llm_cost_usd, sum(f.tool_cost_usd) AS tool_cost_usd,
       sum(f.payments_out_usd) AS payments_out_usd, sum(f.cost_usd) AS cost_usd, sum(f.revenue_usd) AS revenue_usd,
       sum(f.margin_usd) AS margin_usd, sum(f.cache_savings_usd) AS cache_savings_usd,
       sum(f.estimated_cost_usd) AS estimated_cost_usd,
       o.outcome, o.completed_at
FROM finance_fact_usd f
LEFT JOIN run_outcome o ON o.workspace_id = f.workspace_id AND o.run_id = f.run_id
WHERE f.run_id IS NOT NULL
GROUP BY f.workspace_id, f.run_id, o.outcome, o.completed_at;

-- Per workspace, agent (null: unattributed) and UTC day.
CREATE VIEW finance_by_agent_day AS
SELECT workspace_id, agent_id, (occurred_at AT TIME ZONE 'UTC')::date AS day,
       sum(requests) AS requests, sum(errors) AS errors, sum(input_tokens) AS input_tokens,
       sum(output_tokens) AS output_tokens, sum(unpriced_tokens) AS unpriced_tokens,
       sum(llm_cost_usd) AS llm_cost_usd, sum(tool_cost_usd) AS tool_cost_usd,
       sum(payments_out_usd) AS payments_out_usd, sum(cost_usd) AS cost_usd, sum(revenue_usd) AS revenue_usd,
       sum(margin_usd) AS margin_usd, sum(cache_savings_usd) AS cache_savings_usd,
       sum(estimated_cost_usd) AS estimated_cost_usd
FROM finance_fact_usd
GROUP BY 1, 2, 3;

-- Per workspace and UTC month (`month` is its first day).
CREATE VIEW finance_by_workspace_month AS
SELECT workspace_id, date_trunc('month', occurred_at AT TIME ZONE 'UTC')::date AS month,
       sum(requests) AS requests, sum(errors) AS errors, sum(input_tokens) AS input_tokens,
       sum(output_tokens) AS output_tokens, sum(unpriced_tokens) AS unpriced_tokens,
       sum(llm_cost_usd) AS llm_cost_usd, sum(tool_cost_usd) AS tool_cost_usd,
       sum(payments_out_usd) AS payments_out_usd, sum(cost_usd) AS cost_usd, sum(revenue_usd) AS revenue_usd,
       sum(margin_usd) AS margin_usd, sum(cache_savings_usd) AS cache_savings_usd,
       sum(estimated_cost_usd) AS estimated_cost_usd
FROM finance_fact_usd
GROUP BY 1, 2;

-- Per run: revenue against total cost; margin_pct = margin / revenue * 100 (null without revenue).
CREATE VIEW margin_by_run AS
SELECT workspace_id, run_id, agents, first_at, last_at, revenue_usd, cost_usd, margin_usd,
       CASE WHEN revenue_usd > 0 THEN round(margin_usd * 100 / revenue_usd, 2) END AS margin_pct,
       outcome
FROM finance_by_run;

-- Tokens of calls no price covered and not re-priced since, per workspace, provider and model.
CREATE VIEW unpriced_usage AS
SELECT workspace_id, provider, model, sum(unpriced_tokens) AS unpriced_tokens,
       count(*) FILTER (WHERE kind = 'llm') - count(*) FILTER (WHERE kind = 'repriced') AS unpriced_calls,
       min(occurred_at) FILTER (WHERE kind = 'llm') AS first_at, max(occurred_at) FILTER (WHERE kind = 'llm') AS last_at
FROM finance_fact
WHERE unpriced_tokens <> 0
GROUP BY 1, 2, 3
HAVING sum(unpriced_tokens) <> 0;
