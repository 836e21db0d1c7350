"""The Lua scripts of `dataplane.governor`: each runs atomically in Redis and touches the keys of
one workspace only (one hash tag, so one Redis Cluster slot). Key layout: `schemas.budget_keys`.

Wire format (kept small: encoding arguments was most of the client's CPU per request):
* KEYS[1] is the workspace's tag `gov:{<ws>}` (`workspace_tag`), the only declared key. The
  scripts name every key they touch `KEYS[1] .. ':' .. <suffix>` (suffixes from
  `schemas.budget_keys`; a budget's six keys add `:spent`, `:holds`, ... to its suffix), so all of
  them are in the declared key's slot. Redis asks scripts to declare their keys; Redis Cluster
  only routes and checks slots by them, and derived names in the same slot work there. (A store
  that locks declared keys only, such as Dragonfly, needs its allow-undeclared-keys setting.)
* ARGV[1] is one string of fields, each ended by ',': a number is its decimal digits (an integer,
  or a float's `repr` for a GCRA correction); a string is a netstring `<byte length>:<bytes>,`, so
  ids may hold any byte. Read in order by `field`/`int`/`str` below. ARGV[2] is the hold id
  (the request id) where the script has one.
* ADMIT replies one flat array of integers (layout above the script).

Conventions inside the scripts:
* money and counts are integer nano-USD / integers; Lua numbers are doubles, so amounts are exact
  up to 2^53 nano-USD (about $9.007M) per budget period (`MAX_EXACT_NANOS`, checked by the
  caller). Numbers sent back to Redis go through `fmt` (never `tostring`, which may write `1e+15`);
  the settled cost goes to INCRBY as the caller's own digits;
* times are epoch ms from the caller's clock; GCRA times are fractional ms stored with 17
  significant digits, so they read back exactly;
* every script that touches a budget first sweeps its expired holds (at most `SWEEP_MAX` per call;
  the rest stay counted, which only errs towards refusing) -- TigerBeetle's pending-transfer
  timeout, done by hand;
* the settlement scripts start with a `SET NX` marker (`op_marker_key`: `op:<s|d|v>:<hold id>`,
  kept `MARKER_TTL_MS`): a batch retried after a lost reply applies each settlement once. A retry
  later than that may count a settlement's spend twice (the refusing side; the debit and void parts
  are idempotent by themselves).
"""

from __future__ import annotations

from schemas.budget_keys import BudgetKeys

MAX_EXACT_NANOS = 2**53
MARKER_TTL_MS = 900_000
SWEEP_MAX = 1000

# ADMIT's reply: fail kinds (0 = admitted).
FAIL_RATE, FAIL_CONC, FAIL_BUDGET = 1, 2, 3

_BUDGET_KEYS = ", ".join(f"p .. ':{name}'" for name in BudgetKeys._fields)

_COMMON = r"""
local T, S, P = KEYS[1] .. ':', ARGV[1], 1
-- The next field of ARGV[1]: as a string, as a number, or a netstring's content.
local function field()
  local e = string.find(S, ',', P, true)
  local v = string.sub(S, P, e - 1)
  P = e + 1
  return v
end
local function int() return tonumber(field()) end
-- The next n numbers. (Read one statement at a time, never as `int(), int()`: Lua does not define
-- the order in which an expression list is evaluated.)
local function ints(n)
  local t = {}
  for i = 1, n do t[i] = int() end
  return unpack(t)
end
local function str()
  local c = string.find(S, ':', P, true)
  local n = tonumber(string.sub(S, P, c - 1))
  local v = string.sub(S, c + 1, c + n)
  P = c + n + 2
  return v
end
-- The keys of one budget window from its suffix: spent, holds, hexp, held, leases, alerts.
local function bkeys(suffix) local p = T .. suffix return """ + _BUDGET_KEYS + r""" end

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

-- `at`: epoch ms as the caller's digits, '0' = never.
local function expire_at(keys, at)
  if at ~= '0' then
    for _, k in ipairs(keys) do redis.call('PEXPIREAT', k, at) end
  end
end

-- Remove a request's hold from one budget (settle, void).
local function drop_hold(holds, hexp, held_key, hold_id)
  local v = redis.call('HGET', holds, hold_id)
  if v then
    redis.call('HDEL', holds, hold_id)
    redis.call('ZREM', hexp, hold_id)
    redis.call('SET', held_key, fmt(math.max(0, num(redis.call('GET', held_key)) - tonumber(v))), 'KEEPTTL')
  end
end
"""

# ARGV[1]: now_ms, hold_nanos, hold_ttl_ms, n_budgets, n_rates, n_conc, lease_id$, then
#   per budget: suffix$, limit_nanos, expire_at_ms (0 = never), n_thresholds, thresholds...;
#   per rate: suffix$, period_ms, limit, quantity; per concurrency limit: suffix$, max in flight.
#   ($ = netstring.) ARGV[2]: hold id.
# Reply (integers): ok, fail_kind (FAIL_*; 0 when ok), fail_index (1-based), fail_spent,
#   fail_held; then 4 per rate: ok, remaining, reset_ms, retry_after_ms; then, only when ok, per
#   budget: remaining, lease_left, lease_expires_ms, committed, n_crossed, crossed thresholds...
ADMIT = _COMMON + r"""
local now, h, ttl, nb, nr, nc = ints(6)
local lease_id, hold_id = str(), ARGV[2]
local bud = {}
for j = 1, nb do
  local b = {bkeys(str())}
  b.limit = int()
  b.exp_at = field()
  b.th = {}
  for a = 1, int() do b.th[a] = int() end
  bud[j] = b
end
local r = {0, 0, 0, 0, 0}

-- 1. rate limits (GCRA: one stored time per limiter; burst = the limit itself)
local rkeys, new_tats = {}, {}
for i = 1, nr do
  local key = T .. str()
  local period, limit, q = ints(3)
  local t = period / limit
  local tat = num(redis.call('GET', key))
  if tat < now then tat = now end
  local new = tat + q * t
  rkeys[i], new_tats[i] = key, new
  local n = #r
  -- the 0.001 ms slack absorbs float rounding of t (e.g. 60000 / 7)
  if new - now <= period + 0.001 then
    r[n + 1], r[n + 2], r[n + 3], r[n + 4] = 1, math.floor((period - (new - now)) / t + 1e-9), math.ceil(new - now), 0
  else
    r[n + 1], r[n + 2], r[n + 3], r[n + 4] = 0, math.floor(math.max(0, period - (tat - now)) / t + 1e-9),
      math.ceil(tat - now), math.ceil(new - now - period)
    if r[2] == 0 then r[2], r[3] = 1, i end
  end
end

-- 2. concurrency (a ZSET of request ids scored by expiry, so a dead worker's entries lapse)
local ckeys = {}
for i = 1, nc do
  local key = T .. str()
  local max = int()
  ckeys[i] = key
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if r[2] == 0 and redis.call('ZCARD', key) >= max then r[2], r[3] = 2, i end
end

-- 3. budgets: spent + held + (hold - what this worker's lease covers) <= limit
if r[2] == 0 then
  for j = 1, nb do
    local b = bud[j]
    local holds, hexp, held_key, leases = b[2], b[3], b[4], b[5]
    local held = sweep(holds, hexp, held_key, leases, now)
    local spent = num(redis.call('GET', b[1]))
    local mine = num(redis.call('HGET', holds, lease_id))
    local use = math.min(mine, h)
    if spent + held + h - use > b.limit then
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
    if spent + held + h - use > b.limit then
      r[2], r[3], r[4], r[5] = 3, j, spent, held - mine
      break
    end
    b.spent, b.held, b.mine, b.use = spent, held, mine, use
  end
end
if r[2] ~= 0 then return r end

-- 4. all passed: charge everything
r[1] = 1
local h_s, until_s = fmt(h), fmt(now + ttl)
for i = 1, nr do
  local new = new_tats[i]
  redis.call('SET', rkeys[i], fmt17(new), 'PX', math.ceil(new - now) + 1000)
end
for i = 1, nc do
  redis.call('ZADD', ckeys[i], until_s, hold_id)
  extend_ttl(ckeys[i], ttl + 1000)
end
for j = 1, nb do
  local b = bud[j]
  local holds, hexp, held_key, leases, alerts = b[2], b[3], b[4], b[5], b[6]
  if b.use > 0 then redis.call('HINCRBY', holds, lease_id, fmt(-b.use)) end
  if h > 0 then
    redis.call('HSET', holds, hold_id, h_s)
    redis.call('ZADD', hexp, until_s, hold_id)
  end
  local held = b.held + h - b.use
  redis.call('SET', held_key, fmt(held))
  local committed = b.spent + held - leased(holds, leases)
  local crossed = {}
  for _, t in ipairs(b.th) do
    if committed * 100 >= t * b.limit and redis.call('SADD', alerts, t) == 1 then crossed[#crossed + 1] = t end
  end
  -- (the alerts set gets its expiry when a threshold is first added to it)
  expire_at(#crossed > 0 and {holds, hexp, held_key, alerts} or {holds, hexp, held_key}, b.exp_at)
  local n = #r
  r[n + 1], r[n + 2], r[n + 3], r[n + 4], r[n + 5] = b.limit - committed, b.mine - b.use,
    num(redis.call('ZSCORE', hexp, lease_id)), committed, #crossed
  for k, t in ipairs(crossed) do r[n + 5 + k] = t end
end
return r
"""

# Settle one admission. ARGV[1]: cost_nanos, marker_ttl_ms, n_budgets, n_token_rates, n_conc,
#   then per budget: suffix$, expire_at_ms; per token limiter: suffix$, the TAT correction in ms
#   ((actual - estimated) * period / limit); per concurrency limiter: suffix$. ARGV[2]: hold id.
# Returns 1, or 0 when this settlement was applied before.
SETTLE = _COMMON + r"""
local cost = field()
local marker_ttl = field()
local nb, nt, nc = ints(3)
local hold_id = ARGV[2]
if not redis.call('SET', T .. 'op:s:' .. hold_id, '1', 'NX', 'PX', marker_ttl) then return 0 end
for _ = 1, nb do
  local spent, holds, hexp, held_key = bkeys(str())
  local exp_at = field()
  drop_hold(holds, hexp, held_key, hold_id)
  -- spend is spend, whether or not the hold was still there
  redis.call('INCRBY', spent, cost)
  expire_at({spent}, exp_at)
end
for _ = 1, nt do
  local key = T .. str()
  local correction = int()
  local tat = redis.call('GET', key)
  if tat then redis.call('SET', key, fmt17(tonumber(tat) + correction), 'KEEPTTL') end
end
for _ = 1, nc do redis.call('ZREM', T .. str(), hold_id) end
return 1
"""

# Record in Redis a request admitted from this worker's lease while Redis was unreachable: move
# `hold` from the lease to a request hold (if the lease lapsed meanwhile, the hold is added
# anyway: the money is being spent). ARGV[1]: now_ms, hold_nanos, hold_ttl_ms, marker_ttl_ms,
# n_budgets, lease_id$, then per budget: suffix$, expire_at_ms. ARGV[2]: hold id.
DEBIT = _COMMON + r"""
local now, h, ttl = ints(3)
local marker_ttl = field()
local nb = int()
local lease_id, hold_id = str(), ARGV[2]
if not redis.call('SET', T .. 'op:d:' .. hold_id, '1', 'NX', 'PX', marker_ttl) then return 0 end
for _ = 1, nb do
  local _spent, holds, hexp, held_key, leases = bkeys(str())
  local exp_at = field()
  local held = sweep(holds, hexp, held_key, leases, now)
  -- (a hold already there was recorded by an earlier send of this debit: the counter has it)
  if h > 0 and redis.call('HEXISTS', holds, hold_id) == 0 then
    local use = math.min(num(redis.call('HGET', holds, lease_id)), h)
    if use > 0 then redis.call('HINCRBY', holds, lease_id, fmt(-use)) end
    redis.call('HSET', holds, hold_id, fmt(h))
    redis.call('ZADD', hexp, fmt(now + ttl), hold_id)
    redis.call('SET', held_key, fmt(held + h - use))
    expire_at({holds, hexp, held_key}, exp_at)
  end
end
return 1
"""

# Undo an admission whose reply was lost (it may or may not have applied): drop its holds (the
# capacity goes back to the pool) and its concurrency entries. ARGV[1]: marker_ttl_ms, n_budgets,
# n_conc, then per budget suffix$, per concurrency limiter suffix$. ARGV[2]: hold id.
VOID = _COMMON + r"""
local marker_ttl = field()
local nb, nc = ints(2)
local hold_id = ARGV[2]
if not redis.call('SET', T .. 'op:v:' .. hold_id, '1', 'NX', 'PX', marker_ttl) then return 0 end
for _ = 1, nb do
  local _spent, holds, hexp, held_key = bkeys(str())
  drop_hold(holds, hexp, held_key, hold_id)
end
for _ = 1, nc do redis.call('ZREM', T .. str(), hold_id) end
return 1
"""

# Keep the holds and concurrency entries of a call still in flight on a live worker from lapsing.
# ARGV[1]: expires_ms, ttl_ms, n, then n ZSET suffixes$ (each budget's hexp, each concurrency
# limiter). ARGV[2]: hold id. Only existing entries are touched (ZADD XX): a settled call is not
# brought back.
EXTEND = _COMMON + r"""
local expires = field()
local ttl, n = ints(2)
local hold_id = ARGV[2]
for _ = 1, n do
  local key = T .. str()
  if redis.call('ZADD', key, 'XX', 'CH', expires, hold_id) == 1 then extend_ttl(key, ttl + 1000) end
end
return 1
"""

# Sweep one budget and size this worker's lease: min(cap, (free + mine) / (2 * fleet)), never
# more than is free; cap 0 releases the lease. ARGV[1]: now_ms, lease_ttl_ms, limit_nanos,
# cap_nanos, fleet_size, expire_at_ms, suffix$, lease_id$.
# Returns {lease_nanos, lease_expires_ms, held_after}.
LEASE = _COMMON + r"""
local now, ttl, limit, cap, fleet = ints(5)
local exp_at = field()
local spent_key, holds, hexp, held_key, leases = bkeys(str())
local lease_id = str()
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
expire_at({holds, hexp, held_key, leases}, exp_at)
return {target, now + ttl, held}
"""
