-- Fixed window, with exactly the Python router's key and semantics, for a batch of
-- counters in one call (one script invocation costs Redis far more than the commands in
-- it, so a burst of messages shares one).
--
-- For each counter: INCR it; the first message of a window (or a counter left without a
-- TTL) sets EXPIRE to the window. All of it runs atomically, so no crash can leave a
-- counter without its expiry.
--
-- A rejected message also learns whether its sender is the first to be told in this
-- window: the marker {counter}:notified:{tag} lives until the sender may write again.
--
-- A message with an id is counted once: its decision is kept in the hash {counter}:seen
-- (field: the id), which expires with the window, and a redelivery gets that decision
-- back without counting again.
--
-- KEYS[i]       a counter: {key_prefix}{tenant_id}:ratelimit:{channel}
-- ARGV[4i-3]    its window length in seconds
-- ARGV[4i-2]    its limit
-- ARGV[4i-1]    the sender's notification tag, or "" to notify every rejection
-- ARGV[4i]      the message id, or "" when it has none
-- Returns       {count, pttl_ms, notify (1/0)} for each key: the count after this
--               message and the milliseconds until the window resets. A key may appear
--               more than once; each appearance is one message.
local out = {}
for i, key in ipairs(KEYS) do
  local window = ARGV[4 * i - 3]
  local id = ARGV[4 * i]
  local seen_key = key .. ':seen'
  local seen = nil
  if id ~= '' then
    seen = redis.call('HGET', seen_key, id)
  end
  local count, pttl, notify
  if seen then
    local sep = string.find(seen, ':', 1, true)
    count = tonumber(string.sub(seen, 1, sep - 1))
    notify = tonumber(string.sub(seen, sep + 1))
    pttl = redis.call('PTTL', key)
    if pttl < 0 then pttl = tonumber(window) * 1000 end
  else
    count = redis.call('INCR', key)
    pttl = redis.call('PTTL', key)
    if count == 1 or pttl < 0 then
      redis.call('EXPIRE', key, window)
      pttl = tonumber(window) * 1000
    end
    notify = 1
    local tag = ARGV[4 * i - 1]
    if count > tonumber(ARGV[4 * i - 2]) and tag ~= '' then
      if not redis.call('SET', key .. ':notified:' .. tag, '1', 'NX', 'PX', math.max(1, pttl)) then
        notify = 0
      end
    end
    if id ~= '' then
      redis.call('HSET', seen_key, id, count .. ':' .. notify)
      redis.call('PEXPIRE', seen_key, math.max(1, pttl))
    end
  end
  out[3 * i - 2] = count
  out[3 * i - 1] = pttl
  out[3 * i] = notify
end
return out
