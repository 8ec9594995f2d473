-- Fixed window, with exactly the Python router's key and semantics:
-- INCR the counter; the first message of a window (or a counter left without a TTL)
-- sets EXPIRE to the window. One script call, so no crash can leave a counter without
-- its expiry.
--
-- KEYS[1]  the counter: {key_prefix}{tenant_id}:ratelimit:{channel}
-- ARGV[1]  window length in seconds
-- Returns  {count after this message, milliseconds until the window resets}
local count = redis.call('INCR', KEYS[1])
local pttl = redis.call('PTTL', KEYS[1])
if count == 1 or pttl < 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[1])
  pttl = tonumber(ARGV[1]) * 1000
end
return {count, pttl}
