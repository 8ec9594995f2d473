-- Token bucket as GCRA (generic cell rate algorithm): one stored number per key, the
-- theoretical arrival time (TAT) of the next message. A message is allowed when it does
-- not arrive earlier than TAT - burst * interval; then TAT moves one interval on. Exact
-- and smooth: `requests` per window on average, up to `burst` at once.
--
-- Every key a check touches is passed in KEYS, all in the counter's cluster slot:
-- KEYS[4i-3]    the TAT key ({counter}:bucket, where {counter} is the counter key in braces)
-- KEYS[4i-2]    its decision for this message id ({counter}:bucket:seen-at:{id})
-- KEYS[4i-1]    the senders told ({counter}:bucket:notified, see notice.lua)
-- KEYS[4i]      the id's confirmed-output marker ({counter}:done:{id}, see fixed_window.lua),
--               or the state key again when duplicates are forwarded
-- ARGV[1]       the time in microseconds, or "" to use Redis's clock (tests pass a clock)
-- ARGV[5i-3] .. ARGV[5i+1]  requests, window in milliseconds, burst, the sender's
--               notification tag ("" to notify every rejection), and the message id
--               ("" when it has none) for check i; a tag "~line:…" or "~back:…" asks
--               for the wait for the message's turn in a deferring rule's line instead
--               (take_turn in notice.lua), returned in place of notify. A message with an id is counted once:
--               a redelivery within the window (at most an hour) gets the first decision
--               back (its waits counted from now), marked as replayed (2 when the gate had confirmed the first output,
--               see mark_forwarded.lua, else 1); the bucket key expiring when full does not matter.
-- Returns       {allowed (1/0), remaining, reset_ms, retry_after_ms, notify (1/0),
--               replayed (0/1/2, 3: a duplicate whose output was confirmed)} for each key, or {"err", error text, 0, 0, 0, 0} when this
--               key could not be checked (the others are decided as usual).
local SEEN_MAX_MS = 3600000
local now_us = clock_us()

local function check(i, key, seen_key, notified_key, done_key)
  local requests = tonumber(ARGV[5 * i - 3])
  local window_us = tonumber(ARGV[5 * i - 2]) * 1000
  local burst = tonumber(ARGV[5 * i - 1])
  local tag = ARGV[5 * i]
  local id = ARGV[5 * i + 1]
  -- The bucket's key expires whenever the bucket is full again, so a replay does not
  -- depend on it: the kept decision alone (for the window) is replayed.
  if done_key ~= key and redis.call('EXISTS', done_key) == 1 then
    return 0, 0, 0, 0, 0, 3
  end
  if id ~= '' then
    local seen = redis.call('GET', seen_key)
    if seen then
      local v = {}
      for value in string.gmatch(seen, '[^:]+') do v[#v + 1] = tonumber(value) end
      -- A malformed record is not a decision: decide afresh.
      if #v >= 5 then
        local replayed = 1
        if string.sub(seen, -2) == ':f' then replayed = 2 end
        -- Kept as moments, so a replay tells the wait from now, not the first one's.
        local now_ms = now_us / 1000
        -- A line's turn too is kept as a moment.
        if line_of(tag) then v[5] = math.max(0, math.ceil(v[5] - now_ms)) end
        return v[1], v[2], math.max(0, math.ceil(v[3] - now_ms)), math.max(0, math.ceil(v[4] - now_ms)), v[5], replayed
      end
    end
  end
  -- A line's share of the window: one interval.
  local share = window_us / 1000 / math.max(1, requests)
  if behind_line(notified_key, tag, now_us / 1000, share) then
    local turn = take_turn(notified_key, tag, now_us / 1000, 0, share)
    if id ~= '' then
      local at = math.floor(now_us / 1000 + turn)
      redis.call('SET', seen_key, string.format('%d:%d:%d:%d:%d', 0, 0, at, at, at), 'PX', math.min(math.ceil(window_us / 1000), SEEN_MAX_MS))
    end
    return 0, 0, turn, turn, turn, 0
  end
  local stored = redis.call('GET', key)
  -- TAT is stored in whole microseconds: an interval below one would be lost to rounding
  -- (and let everything through), so rates above a million per second per key count as
  -- a million per second.
  local interval = math.max(1, window_us / requests)
  local tat = now_us
  if stored then
    tat = tonumber(stored)
    -- tonumber also reads "inf" and "nan", which no bucket ever stores.
    if not tat or tat ~= tat or tat == math.huge or tat == -math.huge then
      error({err = 'the token bucket at ' .. key .. ' does not hold a number'})
    end
  end
  if tat < now_us then tat = now_us end
  local new_tat = tat + interval
  local allow_at = new_tat - burst * interval
  local allowed, remaining, reset, retry
  if now_us >= allow_at then
    allowed = 1
    -- A huge burst can run TAT far ahead: the expiry is written in full digits and kept
    -- below Redis's ceiling (10^15 ms is over 30,000 years).
    local px = math.min(math.max(1, math.ceil((new_tat - now_us) / 1000)), 1e15)
    redis.call('SET', key, string.format('%.0f', new_tat), 'PX', string.format('%d', px))
    remaining = math.floor((now_us - allow_at) / interval)
    reset = new_tat - now_us
    retry = 0
  else
    allowed = 0
    remaining = 0
    reset = tat - now_us
    retry = allow_at - now_us
  end
  local notify, kept = 1, 1
  local turn = allowed == 0
    and take_turn(notified_key, tag, now_us / 1000, retry / 1000, share)
  if turn then
    -- A deferring rule's line (KEYS[4i-1] is {state}:turn, see notice.lua): the wait
    -- for this message's turn, returned in place of notify (kept as its moment).
    notify, kept = turn, math.floor(now_us / 1000 + turn)
  elseif allowed == 0 and tag ~= '' then
    if not first_notice(notified_key, tag, now_us / 1000, retry / 1000, id) then
      notify, kept = 0, 0
    end
  end
  local reset_ms = math.ceil(reset / 1000)
  local retry_ms = math.ceil(retry / 1000)
  if id ~= '' then
    -- string.format, not `..`: Lua writes numbers from 1e14 on as "1e+14".
    redis.call('SET', seen_key, string.format('%d:%d:%d:%d:%d', allowed, remaining, math.floor(now_us / 1000 + reset_ms), math.floor(now_us / 1000 + retry_ms), kept), 'PX', math.min(math.ceil(window_us / 1000), SEEN_MAX_MS))
  end
  return allowed, remaining, reset_ms, retry_ms, notify, 0
end

local out = {}
for i = 1, #KEYS / 4 do
  local r = {pcall(check, i, KEYS[4 * i - 3], KEYS[4 * i - 2], KEYS[4 * i - 1], KEYS[4 * i])}
  if not r[1] then
    local e = r[2]
    r = {true, 'err', type(e) == 'table' and tostring(e.err) or tostring(e), 0, 0, 0, 0}
  end
  for j = 1, 6 do out[6 * i - 6 + j] = r[j + 1] end
end
return out
