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
-- KEYS[i]       a counter: {key_prefix}{tenant_id}:ratelimit:{channel}
-- ARGV[3i-2]    its window length in seconds
-- ARGV[3i-1]    its limit
-- ARGV[3i]      the sender's notification tag, or "" to notify every rejection
-- Returns       {count, pttl_ms, notify (1/0)} for each key: the count after this
--               message and the milliseconds until the window resets. A key may appear
--               more than once; each appearance is one message.
local out = {}
for i, key in ipairs(KEYS) do
  local window = ARGV[3 * i - 2]
  local count = redis.call('INCR', key)
  local pttl = redis.call('PTTL', key)
  if count == 1 or pttl < 0 then
    redis.call('EXPIRE', key, window)
    pttl = tonumber(window) * 1000
  end
  local notify = 1
  local tag = ARGV[3 * i]
  if count > tonumber(ARGV[3 * i - 1]) and tag ~= '' then
    if not redis.call('SET', key .. ':notified:' .. tag, '1', 'NX', 'PX', math.max(1, pttl)) then
      notify = 0
    end
  end
  out[3 * i - 2] = count
  out[3 * i - 1] = pttl
  out[3 * i] = notify
end
return out
