-- Limits that compose: a message checked against its (tenant, channel) limit and the
-- limits `[[limits.also]]` adds (the tenant's budget, its sender's limit), by its cost,
-- all or none. Every limit is read first; only when each of them has room for the cost is
-- the message counted, by every one of them. A rejected message writes no limit's state,
-- so a limit that rejects never spends another's budget. A cost of 0 always passes and is
-- counted nowhere.
--
-- Each limit keeps the state its algorithm's own script keeps (fixed_window.lua,
-- sliding_window.lua, token_bucket.lua), in the same format, so a message of cost 1 with
-- no other limit, checked there, and one checked here count against the same window.
--
-- ARGV[1]     the time in microseconds, or "" to use Redis's clock (tests pass a clock)
-- ARGV[2]     the number of checks
-- Then for each check, in order:
--   ARGV      n (its limits), cost, the sender's notification tag ("" to notify every
--             rejection), the message id ("" when it has none), then for each limit:
--             algorithm ("f", "s" or "b"), requests, window in milliseconds, burst; or a
--             tenant budget reserved beforehand: "r", 1/0 (it had room), its window, and
--             "{remaining}:{reset_ms}:{wait_ms}" (its key is the first state again)
--   KEYS      the first limit's state (the (tenant, channel) one), its decisions by id
--             (the hash {state base}:all:seen, field: the id), its senders told (notice.lua), the id's
--             confirmed-output marker ({counter}:done:{id}), then the other limits'
--             states; a companion that is not used is the first state again
-- Returns     for each check {allowed (1/0), the deciding limit (1-based), remaining,
--             reset_ms, retry_ms, notify (1/0), replayed (0/1/2, 3: a duplicate)}, or
--             {"err", error text, 0, 0, 0, 0, 0} when it could not be checked. The deciding
--             limit of a rejection is the one with the longest wait among those that
--             rejected; of an allowed message, the one with the fewest units left.
local SEEN_MAX_MS = 3600000
local now_us = clock_us()
local now = now_us / 1000

local function number_in(key, text, what)
  local n = tonumber(text)
  if not n or n ~= n or n == math.huge or n == -math.huge then
    error({err = 'the ' .. what .. ' at ' .. key .. ' does not hold a number'})
  end
  return n
end

-- Each algorithm reads its state and says whether `cost` fits now: {ok, remaining after
-- this message, ms until the window resets, ms until the cost would fit, the write that
-- counts it}. A cost larger than the limit itself never fits; its wait is a whole window.

local function fixed(key, requests, window, cost)
  local stored = redis.call('GET', key)
  local count = 0
  if stored then
    -- Only what INCRBY will take: a counter it would refuse fails here, before any limit
    -- of the message is counted.
    if not string.match(stored, '^%-?%d+$') or #stored > 18 then
      error({err = 'the counter at ' .. key .. ' does not hold a number'})
    end
    count = tonumber(stored)
  end
  local pttl = redis.call('PTTL', key)
  local reset = pttl > 0 and pttl or window
  local ok = count + cost <= requests
  local wait = 0
  if not ok then wait = cost <= requests and reset or window end
  return ok, math.max(0, requests - count - (ok and cost or 0)), reset, wait, function()
    redis.call('INCRBY', key, cost)
    -- The first message of a window, or a counter left without a TTL, starts the window.
    if pttl < 0 then redis.call('PEXPIRE', key, window) end
  end
end

local function sliding(key, requests, window, cost)
  local index = math.floor(now / window)
  local stored = redis.call('HMGET', key, 'index', 'current', 'previous')
  local current, previous = 0, 0
  if stored[1] then
    local was = number_in(key, stored[1], 'sliding window')
    if was == index then
      current = number_in(key, stored[2], 'sliding window')
      previous = number_in(key, stored[3], 'sliding window')
    elseif was == index - 1 then
      previous = number_in(key, stored[2], 'sliding window')
    end
  end
  local elapsed = now - index * window
  local estimate = previous * (window - elapsed) / window + current
  local ok = estimate + cost <= requests
  local wait = 0
  if not ok then
    if cost > requests then
      wait = window
    elseif current + cost <= requests and previous > 0 then
      -- Within this window, once the previous one's weight has shrunk enough.
      wait = window * (1 - (requests - cost - current) / previous) - elapsed
    else
      -- In the next window, where this window's count becomes the previous one.
      local e = 0
      if current > 0 then e = math.max(0, window * (1 - (requests - cost) / current)) end
      wait = (window - elapsed) + e
    end
  end
  local remaining = math.floor(requests - estimate - (ok and cost or 0))
  return ok, math.max(0, remaining), window - elapsed, math.max(0, wait), function()
    redis.call('HSET', key, 'index', index, 'current', current + cost, 'previous', previous)
    redis.call('PEXPIRE', key, math.ceil(2 * window - elapsed))
  end
end

local function bucket(key, requests, window, burst, cost)
  local interval = math.max(1, window * 1000 / requests)
  local stored = redis.call('GET', key)
  local tat = stored and number_in(key, stored, 'token bucket') or now_us
  if tat < now_us then tat = now_us end
  -- TAT is kept in whole microseconds (as token_bucket.lua keeps it): a cost moves it on by
  -- its span rounded down, so costs that add up to the burst exactly fit it exactly.
  local new_tat = tat + math.floor(cost * interval)
  local allow_at = new_tat - burst * interval
  local ok = now_us >= allow_at
  local wait = 0
  if not ok then wait = cost <= burst and (allow_at - now_us) / 1000 or window end
  local free = math.floor((now_us - (tat - burst * interval)) / interval)
  local remaining = ok and free - cost or free
  local reset = ((ok and new_tat or tat) - now_us) / 1000
  return ok, math.max(0, remaining), reset, wait, function()
    local px = math.min(math.max(1, math.ceil((new_tat - now_us) / 1000)), 1e15)
    redis.call('SET', key, string.format('%.0f', new_tat), 'PX', string.format('%d', px))
  end
end

-- A Redis Cluster's tenant budget, reserved in its own slot before this call (refund.lua
-- gives the units back when the message is not let through): its answer, as given.
local function reserved(ok, answer)
  local remaining, reset, wait = string.match(answer, '^(%d+):(%d+):(%d+)$')
  return ok == '1', tonumber(remaining), tonumber(reset), tonumber(wait), function() end
end

local function check(a, k)
  local n = tonumber(ARGV[a])
  local cost = tonumber(ARGV[a + 1])
  local tag = ARGV[a + 2]
  local id = ARGV[a + 3]
  local first, seen_key, notified_key, done_key = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  if done_key ~= first and redis.call('EXISTS', done_key) == 1 then
    return 0, 1, 0, 0, 0, 0, 3
  end
  if id ~= '' then
    local seen = redis.call('HGET', seen_key, id)
    if seen then
      local v = {}
      for value in string.gmatch(seen, '[^:]+') do v[#v + 1] = tonumber(value) end
      -- A malformed record is not a decision: decide afresh.
      if #v >= 6 then
        local replayed = 1
        if string.sub(seen, -2) == ':f' then replayed = 2 end
        -- Kept as moments, so a replay tells the wait from now.
        return v[1], v[2], v[3], math.max(0, math.ceil(v[4] - now)),
          math.max(0, math.ceil(v[5] - now)), v[6], replayed
      end
    end
  end
  local limits = {}
  local longest = 0
  local all_ok = true
  for j = 1, n do
    local at = a + 4 * j
    local algorithm = ARGV[at]
    local requests, window, burst = tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3])
    local key = first
    if j > 1 then key = KEYS[k + 2 + j] end
    longest = math.max(longest, window)
    local ok, remaining, reset, wait, take
    if algorithm == 'f' then
      ok, remaining, reset, wait, take = fixed(key, requests, window, cost)
    elseif algorithm == 's' then
      ok, remaining, reset, wait, take = sliding(key, requests, window, cost)
    elseif algorithm == 'r' then
      ok, remaining, reset, wait, take = reserved(ARGV[at + 1], ARGV[at + 3])
    else
      ok, remaining, reset, wait, take = bucket(key, requests, window, burst, cost)
    end
    -- A cost of 0 always passes, whatever the limits hold (a counter the router pushed
    -- past its limit, a limit lowered below its state).
    ok = ok or cost == 0
    all_ok = all_ok and ok
    limits[j] = {ok = ok, remaining = remaining, reset = reset, wait = wait, take = take}
  end
  local decider = 1
  if all_ok then
    for j = 1, n do
      if cost > 0 then limits[j].take() end
      if limits[j].remaining < limits[decider].remaining then decider = j end
    end
  else
    local wait = -1
    for j = 1, n do
      if not limits[j].ok and limits[j].wait > wait then decider, wait = j, limits[j].wait end
    end
  end
  local d = limits[decider]
  local reset_ms, retry_ms = math.ceil(d.reset), math.ceil(d.wait)
  local notify = 1
  -- A line's tag (a deferring rule) tells nobody here: its final rejection claims its notice.
  if not all_ok and tag ~= '' and not line_of(tag) then
    if not first_notice(notified_key, tag, now, retry_ms, id) then notify = 0 end
  end
  local allowed = all_ok and 1 or 0
  if id ~= '' then
    -- string.format, not `..`: Lua writes numbers from 1e14 on as "1e+14".
    redis.call('HSET', seen_key, id, string.format('%d:%d:%d:%d:%d:%d', allowed, decider, d.remaining,
      math.floor(now + reset_ms), math.floor(now + retry_ms), notify))
    -- One hash per (tenant, channel), living as long as its longest window from its first
    -- id (at most an hour; its expiry is set once, not pushed on by every message).
    if redis.call('PTTL', seen_key) < 0 then
      redis.call('PEXPIRE', seen_key, math.max(1, math.min(longest, SEEN_MAX_MS)))
    end
  end
  return allowed, decider, d.remaining, reset_ms, retry_ms, notify, 0
end

local out = {}
local a, k = 3, 1
for i = 1, tonumber(ARGV[2]) do
  local n = tonumber(ARGV[a])
  local r = {pcall(check, a, k)}
  if not r[1] then
    local e = r[2]
    r = {true, 'err', type(e) == 'table' and tostring(e.err) or tostring(e), 0, 0, 0, 0, 0}
  end
  for j = 1, 7 do out[7 * i - 7 + j] = r[j + 1] end
  a = a + 4 + 4 * n
  k = k + 3 + n
end
return out
