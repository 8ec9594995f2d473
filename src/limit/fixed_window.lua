-- Fixed window, with exactly the Python router's key and semantics, for a batch of
-- counters in one call (one script invocation costs Redis far more than the commands in
-- it, so a burst of messages shares one).
--
-- For each counter: INCR it; the first message of a window (or a counter left without a
-- TTL) sets EXPIRE to the window. All of it runs atomically, so no crash can leave a
-- counter without its expiry.
--
-- Each counter is checked on its own: an error on one (a counter someone SET to text, a
-- wrong type, a value out of range) fails only that counter's check, before it wrote
-- anything, and the others are decided as usual.
--
-- A rejected message also learns whether its sender is the first to be told in this
-- window: the sender's field of {counter}:notified (notice.lua, prepended to this script)
-- lasts until the window ends.
--
-- A message with an id is counted once: its decision is kept in the hash {counter}:seen
-- (field: the id), which expires with the window (at most an hour after its first id), and a
-- redelivery gets that decision back without counting again, marked as replayed (2 when
-- the gate had confirmed the first output, see mark_forwarded.lua, else 1). When the
-- counter itself is gone (it expired, or an operator deleted it), the message is decided
-- afresh.
--
-- Every key a check touches is passed in KEYS, and all of them share the counter's cluster
-- slot (the companions are hash-tagged with the whole counter key), so a Redis Cluster
-- can run the script on the node that owns them.
--
-- With `duplicates = "drop"`, a message whose id already had a confirmed output (the marker
-- {counter}:done:{id}, set by mark_forwarded.lua for the duplicate window) is answered
-- "duplicate" (replayed = 3) at once: nothing counted, nothing replayed.
--
-- KEYS[4i-3]    a counter: {key_prefix}{tenant_id}:ratelimit:{channel}
-- KEYS[4i-2]    its decisions by message id: {counter}:seen
-- KEYS[4i-1]    the senders told in its window: {counter}:notified
-- KEYS[4i]      the id's confirmed-output marker {counter}:done:{id}, or the counter
--               again when duplicates are forwarded
-- ARGV[4i-3]    its window length in seconds
-- ARGV[4i-2]    its limit
-- ARGV[4i-1]    the sender's notification tag, or "" to notify every rejection; "~line:…"
--               or "~back:…" asks for the wait for the message's turn in a deferring
--               rule's line instead (take_turn in notice.lua, KEYS[4i-1] {counter}:turn),
--               returned in place of notify
-- ARGV[4i]      the message id, or "" when it has none
-- Returns       {count, pttl_ms, notify (1/0), replayed (0/1/2/3)} for each key: the count
--               after this message and the milliseconds until the window resets; or
--               {"err", error text, 0, 0} when this key could not be checked. A key may
--               appear more than once; each appearance is one message.
local SEEN_MAX_MS = 3600000

-- Keeps a decision by message id: the hash lives as long as the window, and at most an
-- hour from its first id (its expiry is set once, not pushed on by every message).
local function keep(seen_key, id, count, notify, pttl)
  -- string.format, not `..`: Lua writes numbers from 1e14 on as "1e+14".
  redis.call('HSET', seen_key, id, string.format('%d:%d', count, math.floor(notify)))
  if redis.call('PTTL', seen_key) < 0 then
    redis.call('PEXPIRE', seen_key, math.max(1, math.min(pttl, SEEN_MAX_MS)))
  end
end

local function check(i, key, seen_key, notified_key, done_key)
  local window = tonumber(ARGV[4 * i - 3])
  local limit = tonumber(ARGV[4 * i - 2])
  local tag = ARGV[4 * i - 1]
  local id = ARGV[4 * i]
  if done_key ~= key and redis.call('EXISTS', done_key) == 1 then
    return 0, 0, 0, 3
  end
  if id ~= '' then
    local seen = redis.call('HGET', seen_key, id)
    if seen then
      local pttl = redis.call('PTTL', key)
      local count, notify = string.match(seen, '^(%-?%d+):(%d+)')
      if pttl >= 0 and count then
        local replayed = 1
        if string.sub(seen, -2) == ':f' then replayed = 2 end
        notify = tonumber(notify)
        -- A line's turn is kept as a moment: replayed, it is the wait from now.
        if line_of(tag) then notify = math.max(0, notify - redis_now_ms()) end
        return tonumber(count), pttl, notify, replayed
      end
    end
  end
  local line_now = line_of(tag) and redis_now_ms()
  local share = window * 1000 / math.max(1, limit)
  if line_now and behind_line(notified_key, tag, line_now, share) then
    local turn = take_turn(notified_key, tag, line_now, 0, share)
    if id ~= '' then keep(seen_key, id, limit + 1, line_now + turn, window * 1000) end
    return limit + 1, turn, turn, 0
  end
  local count = redis.call('INCR', key)
  local pttl = redis.call('PTTL', key)
  if count == 1 or pttl < 0 then
    redis.call('EXPIRE', key, window)
    pttl = window * 1000
  end
  local notify = 1
  local kept = 1
  local turn = count > limit and line_now and take_turn(notified_key, tag, line_now, pttl, share)
  if turn then
    -- A deferring rule's line (KEYS[4i-1] is {counter}:turn, see notice.lua): the wait
    -- for this message's turn, returned in place of notify (kept as its moment).
    notify, kept = turn, line_now + turn
  elseif count > limit and tag ~= '' then
    if not first_notice(notified_key, tag, redis_now_ms(), pttl, id) then
      notify, kept = 0, 0
    end
  end
  if id ~= '' then keep(seen_key, id, count, kept, pttl) end
  return count, pttl, notify, 0
end

local out = {}
for i = 1, #KEYS / 4 do
  local ok, a, b, c, d = pcall(check, i, KEYS[4 * i - 3], KEYS[4 * i - 2], KEYS[4 * i - 1], KEYS[4 * i])
  if not ok then
    a, b, c, d = 'err', type(a) == 'table' and tostring(a.err) or tostring(a), 0, 0
  end
  out[4 * i - 3], out[4 * i - 2], out[4 * i - 1], out[4 * i] = a, b, c, d
end
return out
