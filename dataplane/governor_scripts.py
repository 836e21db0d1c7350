"""The Lua scripts of `dataplane.governor`: each runs atomically in Redis and touches the keys of
one workspace only (one hash tag, so one Redis Cluster slot). Key layout: `schemas.budget_keys`.

Conventions inside the scripts:
* money and counts are integer nano-USD / integers; Lua numbers are doubles, so amounts are exact
  up to 2^53 nano-USD (about $9.007M) per budget period (`MAX_EXACT_NANOS`, checked by the
  caller). Numbers sent back to Redis go through `fmt` (never `tostring`, which may write `1e+15`);
* times are epoch ms from the caller's clock; GCRA times are fractional ms stored with 17
  significant digits, so they read back exactly;
* every script that touches a budget first sweeps its expired holds (at most `SWEEP_MAX` per call;
  the rest stay counted, which only errs towards refusing) -- TigerBeetle's pending-transfer
  timeout, done by hand;
* the settlement scripts start with a `SET NX` marker (kept `MARKER_TTL_MS`): a batch retried
  after a lost reply applies each settlement once. A retry later than that may count a settlement's
  spend twice (the refusing side; the debit and void parts are idempotent by themselves).
"""

from __future__ import annotations

MAX_EXACT_NANOS = 2**53
MARKER_TTL_MS = 900_000
SWEEP_MAX = 1000

_COMMON = r"""
local function num(v) return tonumber(v) or 0 end
local function fmt(n) return string.format('%.0f', n) end
local function fmt17(n) return string.format('%.17g', n) end

-- Drop expired holds of one budget; returns the held total after the sweep.
local function sweep(holds, hexp, held_key, leases, now)
  local held = num(redis.call('GET', held_key))
  local expired = redis.call('ZRANGEBYSCORE', hexp, '-inf', now, 'LIMIT', 0, 1000)
  if #expired == 0 then return held end
  for _, id in ipairs(expired) do
    local v = redis.call('HGET', holds, id)
    if v then
      held = held - tonumber(v)
      redis.call('HDEL', holds, id)
    end
    if string.sub(id, 1, 6) == 'lease:' then redis.call('SREM', leases, id) end
  end
  redis.call('ZREM', hexp, unpack(expired))
  -- A negative total would grant capacity that does not exist; it can only come from keys lost
  -- one by one, and 0 is the side that refuses.
  if held < 0 then held = 0 end
  redis.call('SET', held_key, fmt(held), 'KEEPTTL')
  return held
end

-- Sum of the worker leases held on one budget (a handful: one per live worker).
local function leased(holds, leases)
  local total = 0
  for _, id in ipairs(redis.call('SMEMBERS', leases)) do total = total + num(redis.call('HGET', holds, id)) end
  return total
end

-- Make `key` live at least `ms` more (never shortens a longer TTL or removes "no expiry").
local function extend_ttl(key, ms)
  local pttl = redis.call('PTTL', key)
  if pttl >= 0 and pttl < ms then redis.call('PEXPIRE', key, fmt(ms)) end
end

local function expire_at(keys, at)
  if at > 0 then
    for _, k in ipairs(keys) do redis.call('PEXPIREAT', k, fmt(at)) end
  end
end
"""

# KEYS: 6 per budget (spent, holds, hexp, held, leases, alerts), then 1 per rate limiter, then 1
#       per concurrency limiter.
# ARGV: now_ms, hold_id, hold_nanos, hold_ttl_ms, lease_id, n_budgets, n_rates, n_conc,
#       then per budget: limit_nanos, expire_at_ms (0 = never), alert thresholds ("50,80" or "");
#       per rate: period_ms, limit, quantity; per concurrency: max in flight.
# Returns {ok, fail_kind ("rate"|"conc"|"budget"|""), fail_index (1-based), fail_spent,
#          fail_held, rates, concs, budgets}:
#   rates[i]   = {ok, remaining, reset_ms, retry_after_ms}
#   concs[i]   = in flight before this request
#   budgets[j] = {remaining, lease_left, lease_expires_ms, committed, {crossed thresholds}}
ADMIT = _COMMON + r"""
local now, hold_id, h, ttl = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local lease_id = ARGV[5]
local nb, nr, nc = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local rate_at, conc_at = 9 + 3 * nb, 9 + 3 * nb + 3 * nr
local fail_kind, fail_idx, fail_spent, fail_held = '', 0, 0, 0

-- 1. rate limits (GCRA: one stored time per limiter; burst = the limit itself)
local rates, new_tats = {}, {}
for i = 1, nr do
  local key = KEYS[6 * nb + i]
  local a = rate_at + 3 * (i - 1)
  local period, limit, q = tonumber(ARGV[a]), tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local t = period / limit
  local tat = num(redis.call('GET', key))
  if tat < now then tat = now end
  local new = tat + q * t
  new_tats[i] = new
  -- the 0.001 ms slack absorbs float rounding of t (e.g. 60000 / 7)
  if new - now <= period + 0.001 then
    rates[i] = {1, math.floor((period - (new - now)) / t + 1e-9), math.ceil(new - now), 0}
  else
    rates[i] = {0, math.floor(math.max(0, period - (tat - now)) / t + 1e-9), math.ceil(tat - now),
                math.ceil(new - now - period)}
    if fail_kind == '' then fail_kind, fail_idx = 'rate', i end
  end
end

-- 2. concurrency (a ZSET of request ids scored by expiry, so a dead worker's entries lapse)
local concs = {}
for i = 1, nc do
  local key = KEYS[6 * nb + nr + i]
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  concs[i] = redis.call('ZCARD', key)
  if fail_kind == '' and concs[i] >= tonumber(ARGV[conc_at + i - 1]) then fail_kind, fail_idx = 'conc', i end
end

-- 3. budgets: spent + held + (hold - what this worker's lease covers) <= limit
local st = {}
if fail_kind == '' then
  for j = 1, nb do
    local k, a = 6 * (j - 1), 9 + 3 * (j - 1)
    local holds, hexp, held_key, leases = KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], KEYS[k + 5]
    local limit = tonumber(ARGV[a])
    local held = sweep(holds, hexp, held_key, leases, now)
    local spent = num(redis.call('GET', KEYS[k + 1]))
    local mine = num(redis.call('HGET', holds, lease_id))
    local use = math.min(mine, h)
    if spent + held + h - use > limit then
      -- Before refusing, take back the other workers' unused leases: no capacity is stranded.
      for _, id in ipairs(redis.call('SMEMBERS', leases)) do
        if id ~= lease_id then
          held = held - num(redis.call('HGET', holds, id))
          redis.call('HDEL', holds, id)
          redis.call('ZREM', hexp, id)
          redis.call('SREM', leases, id)
        end
      end
      redis.call('SET', held_key, fmt(held), 'KEEPTTL')
    end
    if spent + held + h - use > limit then
      fail_kind, fail_idx, fail_spent, fail_held = 'budget', j, spent, held - mine
      break
    end
    st[j] = {spent, held, mine, use, limit, tonumber(ARGV[a + 1]), ARGV[a + 2]}
  end
end

if fail_kind ~= '' then return {0, fail_kind, fail_idx, fail_spent, fail_held, rates, concs, {}} end

-- 4. all passed: charge everything
for i = 1, nr do
  local new = new_tats[i]
  redis.call('SET', KEYS[6 * nb + i], fmt17(new), 'PX', math.ceil(new - now) + 1000)
end
for i = 1, nc do
  local key = KEYS[6 * nb + nr + i]
  redis.call('ZADD', key, fmt(now + ttl), hold_id)
  extend_ttl(key, ttl + 1000)
end
local out = {}
for j = 1, nb do
  local k = 6 * (j - 1)
  local holds, hexp, held_key, leases, alerts = KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], KEYS[k + 5], KEYS[k + 6]
  local spent, held, mine, use, limit, exp_at, thresholds = unpack(st[j])
  if use > 0 then redis.call('HINCRBY', holds, lease_id, fmt(-use)) end
  if h > 0 then
    redis.call('HSET', holds, hold_id, fmt(h))
    redis.call('ZADD', hexp, fmt(now + ttl), hold_id)
  end
  held = held + h - use
  redis.call('SET', held_key, fmt(held))
  local committed = spent + held - leased(holds, leases)
  local crossed = {}
  for t in string.gmatch(thresholds, '%d+') do
    if committed * 100 >= tonumber(t) * limit and redis.call('SADD', alerts, t) == 1 then
      crossed[#crossed + 1] = tonumber(t)
    end
  end
  expire_at({holds, hexp, held_key, alerts}, exp_at)
  local lease_exp = num(redis.call('ZSCORE', hexp, lease_id))
  out[j] = {limit - committed, mine - use, lease_exp, committed, crossed}
end
return {1, '', 0, 0, 0, rates, concs, out}
"""

# Settle one admission. KEYS: marker, then 4 per budget (spent, holds, hexp, held), then 1 per
# token limiter, then 1 per concurrency limiter.
# ARGV: hold_id, cost_nanos, marker_ttl_ms, n_budgets, n_token_rates, n_conc, then per budget
#       expire_at_ms; per token limiter the TAT correction in ms ((actual - estimated) * period / limit).
# Returns 1, or 0 when this settlement was applied before.
SETTLE = _COMMON + r"""
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[3]) then return 0 end
local hold_id, cost = ARGV[1], ARGV[2]
local nb, nt, nc = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
for j = 1, nb do
  local k = 1 + 4 * (j - 1)
  local v = redis.call('HGET', KEYS[k + 2], hold_id)
  if v then
    redis.call('HDEL', KEYS[k + 2], hold_id)
    redis.call('ZREM', KEYS[k + 3], hold_id)
    redis.call('SET', KEYS[k + 4], fmt(math.max(0, num(redis.call('GET', KEYS[k + 4])) - tonumber(v))), 'KEEPTTL')
  end
  -- spend is spend, whether or not the hold was still there
  redis.call('INCRBY', KEYS[k + 1], cost)
  expire_at({KEYS[k + 1]}, tonumber(ARGV[6 + j]))
end
for i = 1, nt do
  local key = KEYS[1 + 4 * nb + i]
  local tat = redis.call('GET', key)
  if tat then redis.call('SET', key, fmt17(tonumber(tat) + tonumber(ARGV[6 + nb + i])), 'KEEPTTL') end
end
for i = 1, nc do redis.call('ZREM', KEYS[1 + 4 * nb + nt + i], hold_id) end
return 1
"""

# Record in Redis a request admitted from this worker's lease while Redis was unreachable: move
# `hold` from the lease to a request hold (if the lease lapsed meanwhile, the hold is added
# anyway: the money is being spent). KEYS: marker, then 5 per budget (spent, holds, hexp, held,
# leases). ARGV: now_ms, hold_id, hold_nanos, hold_ttl_ms, lease_id, marker_ttl_ms, n_budgets,
# then per budget expire_at_ms.
DEBIT = _COMMON + r"""
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[6]) then return 0 end
local now, hold_id, h, ttl, lease_id = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
for j = 1, tonumber(ARGV[7]) do
  local k = 1 + 5 * (j - 1)
  local holds, hexp, held_key, leases = KEYS[k + 2], KEYS[k + 3], KEYS[k + 4], KEYS[k + 5]
  local held = sweep(holds, hexp, held_key, leases, now)
  -- (a hold already there was recorded by an earlier send of this debit: the counter has it)
  if h > 0 and redis.call('HEXISTS', holds, hold_id) == 0 then
    local use = math.min(num(redis.call('HGET', holds, lease_id)), h)
    if use > 0 then redis.call('HINCRBY', holds, lease_id, fmt(-use)) end
    redis.call('HSET', holds, hold_id, fmt(h))
    redis.call('ZADD', hexp, fmt(now + ttl), hold_id)
    redis.call('SET', held_key, fmt(held + h - use))
    expire_at({holds, hexp, held_key}, tonumber(ARGV[7 + j]))
  end
end
return 1
"""

# Undo an admission whose reply was lost (it may or may not have applied): drop its holds (the
# capacity goes back to the pool) and its concurrency entries. KEYS: marker, then 3 per budget
# (holds, hexp, held), then 1 per concurrency limiter. ARGV: hold_id, marker_ttl_ms, n_budgets.
VOID = _COMMON + r"""
if not redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[2]) then return 0 end
local hold_id, nb = ARGV[1], tonumber(ARGV[3])
for j = 1, nb do
  local k = 1 + 3 * (j - 1)
  local v = redis.call('HGET', KEYS[k + 1], hold_id)
  if v then
    redis.call('HDEL', KEYS[k + 1], hold_id)
    redis.call('ZREM', KEYS[k + 2], hold_id)
    redis.call('SET', KEYS[k + 3], fmt(math.max(0, num(redis.call('GET', KEYS[k + 3])) - tonumber(v))), 'KEEPTTL')
  end
end
for i = 2 + 3 * nb, #KEYS do redis.call('ZREM', KEYS[i], hold_id) end
return 1
"""

# Keep the holds and concurrency entries of a call still in flight on a live worker from lapsing.
# KEYS: the hexp ZSET of each budget, then each concurrency ZSET. ARGV: hold_id, expires_ms, ttl_ms.
# Only existing entries are touched (ZADD XX): a settled call is not brought back.
EXTEND = _COMMON + r"""
for _, key in ipairs(KEYS) do
  if redis.call('ZADD', key, 'XX', 'CH', ARGV[2], ARGV[1]) == 1 then extend_ttl(key, tonumber(ARGV[3]) + 1000) end
end
return 1
"""

# Sweep one budget and size this worker's lease: min(cap, (free + mine) / (2 * fleet)), never
# more than is free; cap 0 releases the lease. KEYS: spent, holds, hexp, held, leases.
# ARGV: now_ms, lease_id, lease_ttl_ms, limit_nanos, cap_nanos, fleet_size, expire_at_ms.
# Returns {lease_nanos, lease_expires_ms, held_after}.
LEASE = _COMMON + r"""
local now, lease_id, ttl = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local limit, cap, fleet = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local spent_key, holds, hexp, held_key, leases = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local held = sweep(holds, hexp, held_key, leases, now)
local spent = num(redis.call('GET', spent_key))
local mine = num(redis.call('HGET', holds, lease_id))
local free = limit - spent - held
local target = math.floor(math.min(cap, (free + mine) / (2 * fleet)))
if target <= 0 then
  if redis.call('HDEL', holds, lease_id) == 1 then
    redis.call('ZREM', hexp, lease_id)
    redis.call('SREM', leases, lease_id)
    held = math.max(0, held - mine)
    redis.call('SET', held_key, fmt(held), 'KEEPTTL')
  end
  return {0, 0, held}
end
redis.call('HSET', holds, lease_id, fmt(target))
redis.call('ZADD', hexp, fmt(now + ttl), lease_id)
redis.call('SADD', leases, lease_id)
held = held + target - mine
redis.call('SET', held_key, fmt(held))
expire_at({holds, hexp, held_key, leases}, tonumber(ARGV[7]))
return {target, now + ttl, held}
"""
