-- Rollups of finance_fact (issue 15: a workspace's month of a million calls answers in well
-- under a second). Each holds, per bucket, the sums `controlplane.finance.aggregates()` reads:
-- the counts of every fact and the amounts of USD facts (so `currency` is always 'USD' here),
-- with `occurred_at` the bucket's start (UTC):
--   finance_daily    per workspace, UTC day, agent and provider: summaries by workspace, agent or
--                    provider per day or month (or none) over day-aligned windows, the top agents;
--   finance_hourly   the same per hour: the same over hour-aligned windows, and per hour;
--   finance_run_day  per workspace, UTC day, run and agent, with the run's first and last fact
--                    that day: the top runs and spikes over day-aligned windows.
-- A statement-level trigger folds the rows each INSERT adds to finance_fact (the finance
-- projection inserts a batch with one COPY, and only facts it does not hold yet), in the same
-- transaction, so a rollup always equals the sums of the facts. Keys are upserted in key order,
-- so two projectors' batches cannot deadlock on them. The fold statements are written once
-- (`finance_rollup_statements`), over the trigger's new rows or, for the backfill below, every
-- fact already folded.
CREATE TABLE finance_hourly (
    workspace_id          text          NOT NULL,
    occurred_at           timestamptz   NOT NULL,
    agent_id              text,
    provider              text,
    currency              text          NOT NULL DEFAULT 'USD',
    requests              bigint        NOT NULL DEFAULT 0,
    errors                bigint        NOT NULL DEFAULT 0,
    input_tokens          bigint        NOT NULL DEFAULT 0,
    output_tokens         bigint        NOT NULL DEFAULT 0,
    unpriced_tokens       bigint        NOT NULL DEFAULT 0,
    llm_cost_nanos        numeric(38,0) NOT NULL DEFAULT 0,
    tool_cost_nanos       numeric(38,0) NOT NULL DEFAULT 0,
    payments_out_nanos    numeric(38,0) NOT NULL DEFAULT 0,
    revenue_nanos         numeric(38,0) NOT NULL DEFAULT 0,
    cache_savings_nanos   numeric(38,0) NOT NULL DEFAULT 0,
    estimated_cost_nanos  numeric(38,0) NOT NULL DEFAULT 0,
    refunds_due_nanos     numeric(38,0) NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX finance_hourly_key ON finance_hourly (workspace_id, occurred_at, agent_id, provider)
    NULLS NOT DISTINCT;
CREATE TABLE finance_daily (LIKE finance_hourly INCLUDING ALL);

-- The same sums per run and day, with the run's first and last fact that day.
CREATE TABLE finance_run_day (LIKE finance_hourly INCLUDING DEFAULTS);
ALTER TABLE finance_run_day DROP COLUMN provider,
    ADD COLUMN run_id text NOT NULL, ADD COLUMN first_at timestamptz NOT NULL,
    ADD COLUMN last_at timestamptz NOT NULL;
CREATE UNIQUE INDEX finance_run_day_key ON finance_run_day (workspace_id, occurred_at, run_id, agent_id)
    NULLS NOT DISTINCT;

-- The statements that fold the facts of `source` (a table or the trigger's transition table) into
-- each rollup: one per rollup, its bucket (`grain`) and key columns (`keys`) filled in.
CREATE FUNCTION finance_rollup_statements(source text) RETURNS SETOF text LANGUAGE sql IMMUTABLE AS $$
    WITH rollup (target, grain, keys, extra_cols, extra_sums, extra_update, filter) AS (VALUES
        ('finance_hourly', 'hour', 'agent_id, provider', '', '', '', ''),
        ('finance_daily', 'day', 'agent_id, provider', '', '', '', ''),
        ('finance_run_day', 'day', 'run_id, agent_id', 'first_at, last_at, ', 'min(occurred_at), max(occurred_at), ',
         'first_at = least(r.first_at, EXCLUDED.first_at), last_at = greatest(r.last_at, EXCLUDED.last_at), ',
         'WHERE run_id IS NOT NULL'))
    SELECT format(
        'INSERT INTO %1$I AS r (workspace_id, occurred_at, %2$s, %3$srequests, errors, input_tokens, output_tokens, '
        'unpriced_tokens, llm_cost_nanos, tool_cost_nanos, payments_out_nanos, revenue_nanos, cache_savings_nanos, '
        'estimated_cost_nanos, refunds_due_nanos) '
        'SELECT workspace_id, date_trunc(%4$L, occurred_at, ''UTC''), %2$s, %5$s'
        'sum(requests), sum(errors), sum(input_tokens), sum(output_tokens), sum(unpriced_tokens), '
        'coalesce(sum(llm_cost_nanos) FILTER (WHERE currency = ''USD''), 0), '
        'coalesce(sum(tool_cost_nanos) FILTER (WHERE currency = ''USD''), 0), '
        'coalesce(sum(payments_out_nanos) FILTER (WHERE currency = ''USD''), 0), '
        'coalesce(sum(revenue_nanos) FILTER (WHERE currency = ''USD''), 0), '
        'coalesce(sum(cache_savings_nanos) FILTER (WHERE currency = ''USD''), 0), '
        'coalesce(sum(estimated_cost_nanos) FILTER (WHERE currency = ''USD''), 0), '
        'coalesce(sum(refunds_due_nanos) FILTER (WHERE currency = ''USD''), 0) '
        'FROM %6$s %7$s GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4 '
        'ON CONFLICT (workspace_id, occurred_at, %2$s) DO UPDATE SET %8$s'
        'requests = r.requests + EXCLUDED.requests, errors = r.errors + EXCLUDED.errors, '
        'input_tokens = r.input_tokens + EXCLUDED.input_tokens, '
        'output_tokens = r.output_tokens + EXCLUDED.output_tokens, '
        'unpriced_tokens = r.unpriced_tokens + EXCLUDED.unpriced_tokens, '
        'llm_cost_nanos = r.llm_cost_nanos + EXCLUDED.llm_cost_nanos, '
        'tool_cost_nanos = r.tool_cost_nanos + EXCLUDED.tool_cost_nanos, '
        'payments_out_nanos = r.payments_out_nanos + EXCLUDED.payments_out_nanos, '
        'revenue_nanos = r.revenue_nanos + EXCLUDED.revenue_nanos, '
        'cache_savings_nanos = r.cache_savings_nanos + EXCLUDED.cache_savings_nanos, '
        'estimated_cost_nanos = r.estimated_cost_nanos + EXCLUDED.estimated_cost_nanos, '
        'refunds_due_nanos = r.refunds_due_nanos + EXCLUDED.refunds_due_nanos',
        target, keys, extra_cols, grain, extra_sums, source, filter, extra_update)
    FROM rollup
$$;

CREATE FUNCTION finance_rollup() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    statement text;
BEGIN
    FOR statement IN SELECT finance_rollup_statements('new_facts') LOOP
        EXECUTE statement;
    END LOOP;
    RETURN NULL;
END
$$;

CREATE TRIGGER finance_fact_rollup AFTER INSERT ON finance_fact
    REFERENCING NEW TABLE AS new_facts FOR EACH STATEMENT EXECUTE FUNCTION finance_rollup();

-- The facts already folded.
DO $$
DECLARE
    statement text;
BEGIN
    FOR statement IN SELECT finance_rollup_statements('finance_fact') LOOP
        EXECUTE statement;
    END LOOP;
END
$$;
