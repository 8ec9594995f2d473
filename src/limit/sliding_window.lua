-- Sliding window: the rolling two-window weighted counter. The estimate at time t is the
-- previous window's count weighted by how much of it still overlaps [t - window, t],
-- plus the current window's count. Only allowed messages are counted. O(1) memory: one
-- hash per key with the current window's index and the two counts.
--
-- Every key a check touches is passed in KEYS, all in the counter's cluster slot:
-- KEYS[4i-3]    the counter hash ({counter}:sliding, where {counter} is the counter key in braces)
-- KEYS[4i-2]    its decision for this message id ({counter}:sliding:seen-at:{id})
-- KEYS[4i-1]    the senders told ({counter}:sliding:notified, see notice.lua)
-- KEYS[4i]      the id's confirmed-output marker ({counter}:done:{id}, see fixed_window.lua),
--               or the state key again when duplicates are forwarded
-- ARGV[1]       the time in microseconds, or "" to use Redis's clock (tests pass a clock)
-- ARGV[4i-2] .. ARGV[4i+1]  limit, window length in milliseconds, the sender's
--               notification tag ("" to notify every rejection), and the message id
--               ("" when it has none) for check i; a tag "~line:…" or "~back:…" asks
--               for the wait for the message's turn in a deferring rule's line instead
--               (take_turn in notice.lua), returned in place of notify. A message with an id is counted once:
--               a redelivery within the window (at most an hour) gets the first decision
--               back (its waits counted from now), marked as replayed (2 when the gate had confirmed the first output,
--               see mark_forwarded.lua, else 1), unless the counter is gone (then it is decided afresh).
-- Returns       {allowed (1/0), remaining, reset_ms, retry_after_ms, notify (1/0),
--               replayed (0/1/2, 3: a duplicate whose output was confirmed)} for each key, or {"err", error text, 0, 0, 0, 0} when this
--               key could not be checked (the others are decided as usual).
local SEEN_MAX_MS = 3600000
local now_us = clock_us()
local now = now_us / 1000

local function check(i, key, seen_key, notified_key, done_key)
  local limit = tonumber(ARGV[4 * i - 2])
  local window = tonumber(ARGV[4 * i - 1])
  local tag = ARGV[4 * i]
  local id = ARGV[4 * i + 1]
  if done_key ~= key and redis.call('EXISTS', done_key) == 1 then
    return 0, 0, 0, 0, 0, 3
  end
  if id ~= '' then
    local seen = redis.call('GET', seen_key)
    if seen and redis.call('EXISTS', key) == 1 then
      local v = {}
      for value in string.gmatch(seen, '[^:]+') do v[#v + 1] = tonumber(value) end
      -- A malformed record is not a decision: decide afresh.
      if #v >= 5 then
        local replayed = 1
        if string.sub(seen, -2) == ':f' then replayed = 2 end
        -- Kept as moments, so a replay tells the wait from now, not the first one's.
        local now_ms = now
        -- A line's turn too is kept as a moment.
        if line_of(tag) then v[5] = math.max(0, math.ceil(v[5] - now_ms)) end
        return v[1], v[2], math.max(0, math.ceil(v[3] - now_ms)), math.max(0, math.ceil(v[4] - now_ms)), v[5], replayed
      end
    end
  end
  -- A line's share of the window: at a steady pace the estimate stays at the count of a
  -- whole window, so only limit - 1 per window pass (one per two windows at a limit of 1).
  local share = limit > 1 and window / (limit - 1) or 2 * window
  if behind_line(notified_key, tag, now, share) then
    local turn = take_turn(notified_key, tag, now, 0, share)
    if id ~= '' then
      local at = math.floor(now + turn)
      redis.call('SET', seen_key, string.format('%d:%d:%d:%d:%d', 0, 0, at, at, at), 'PX', math.min(window, SEEN_MAX_MS))
    end
    return 0, 0, turn, turn, turn, 0
  end
  local index = math.floor(now / window)
  local stored = redis.call('HMGET', key, 'index', 'current', 'previous')
  local current, previous = 0, 0
  if stored[1] then
    local was = tonumber(stored[1])
    if was == index then
      current, previous = tonumber(stored[2]), tonumber(stored[3])
    elseif was == index - 1 then
      previous = tonumber(stored[2])
    end
  end
  if not (current and previous) then
    error({err = 'the sliding window at ' .. key .. ' does not hold numbers'})
  end
  local elapsed = now - index * window
  local weight = (window - elapsed) / window
  local estimate = previous * weight + current
  local allowed = 0
  local retry = 0
  if estimate + 1 <= limit then
    allowed = 1
    current = current + 1
    estimate = estimate + 1
    redis.call('HSET', key, 'index', index, 'current', current, 'previous', previous)
    redis.call('PEXPIRE', key, math.ceil(2 * window - elapsed))
  else
    -- The earliest time the estimate leaves room for one more message.
    if current + 1 <= limit and previous > 0 then
      local e = window * (1 - (limit - 1 - current) / previous)
      retry = e - elapsed
    else
      -- Not in this window: in the next one the current count becomes the previous.
      local e = 0
      if current > 0 then
        e = window * (1 - (limit - 1) / current)
      end
      retry = (window - elapsed) + e
    end
  end
  local remaining = math.floor(limit - estimate)
  if remaining < 0 then remaining = 0 end
  local notify, kept = 1, 1
  local turn = allowed == 0 and take_turn(notified_key, tag, now, retry, share)
  if turn then
    -- A deferring rule's line (KEYS[4i-1] is {state}:turn, see notice.lua): the wait
    -- for this message's turn, returned in place of notify (kept as its moment).
    notify, kept = turn, math.floor(now + turn)
  elseif allowed == 0 and tag ~= '' then
    if not first_notice(notified_key, tag, now, retry, id) then
      notify, kept = 0, 0
    end
  end
  local reset_ms = math.ceil(window - elapsed)
  local retry_ms = math.ceil(retry)
  if id ~= '' then
    -- string.format, not `..`: Lua writes numbers from 1e14 on as "1e+14".
    redis.call('SET', seen_key, string.format('%d:%d:%d:%d:%d', allowed, remaining, math.floor(now + reset_ms), math.floor(now + retry_ms), kept), 'PX', math.min(window, SEEN_MAX_MS))
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
