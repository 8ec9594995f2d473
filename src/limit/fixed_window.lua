-- Fixed window, with exactly the Python router's key and semantics, for a batch of
-- counters in one call (one script invocation costs Redis far more than the commands in
-- it, so a burst of messages shares one).
--
-- For each counter: INCR it; the first message of a window (or a counter left without a
-- TTL) sets EXPIRE to the window. All of it runs atomically, so no crash can leave a
-- counter without its expiry.
--
-- KEYS[i]  a counter: {key_prefix}{tenant_id}:ratelimit:{channel}
-- ARGV[i]  its window length in seconds
-- Returns  {count_1, pttl_ms_1, count_2, pttl_ms_2, ...}: each count after its message,
--          and the milliseconds until its window resets. A key may appear more than once;
--          each appearance is one message.
local out = {}
for i, key in ipairs(KEYS) do
  local count = redis.call('INCR', key)
  local pttl = redis.call('PTTL', key)
  if count == 1 or pttl < 0 then
    redis.call('EXPIRE', key, ARGV[i])
    pttl = tonumber(ARGV[i]) * 1000
  end
  out[2 * i - 1] = count
  out[2 * i] = pttl
end
return out
