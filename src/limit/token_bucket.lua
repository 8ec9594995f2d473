-- Token bucket as GCRA (generic cell rate algorithm): one stored number per key, the
-- theoretical arrival time (TAT) of the next message. A message is allowed when it does
-- not arrive earlier than TAT - burst * interval; then TAT moves one interval on. Exact
-- and smooth: `requests` per window on average, up to `burst` at once.
--
-- KEYS[i]       the TAT key ({key_prefix}{tenant_id}:ratelimit:{channel}:bucket)
-- ARGV[1]       the time in microseconds, or "" to use Redis's clock (tests pass a clock)
-- ARGV[4i-2] .. ARGV[4i+1]  requests, window in milliseconds, burst, and the sender's
--               notification tag ("" to notify every rejection) for KEYS[i]
-- Returns       {allowed (1/0), remaining, reset_ms, retry_after_ms, notify (1/0)} for
--               each key
local now_us
if ARGV[1] ~= '' then
  now_us = tonumber(ARGV[1])
else
  local t = redis.call('TIME')
  now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local out = {}
for i, key in ipairs(KEYS) do
  local requests = tonumber(ARGV[4 * i - 2])
  local window_us = tonumber(ARGV[4 * i - 1]) * 1000
  local burst = tonumber(ARGV[4 * i])
  local tag = ARGV[4 * i + 1]
  local interval = window_us / requests
  local tat = tonumber(redis.call('GET', key) or now_us)
  if tat < now_us then tat = now_us end
  local new_tat = tat + interval
  local allow_at = new_tat - burst * interval
  local allowed, remaining, reset, retry
  if now_us >= allow_at then
    allowed = 1
    redis.call('SET', key, string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now_us) / 1000))
    remaining = math.floor((now_us - allow_at) / interval)
    reset = new_tat - now_us
    retry = 0
  else
    allowed = 0
    remaining = 0
    reset = tat - now_us
    retry = allow_at - now_us
  end
  local notify = 1
  if allowed == 0 and tag ~= '' then
    if not redis.call('SET', key .. ':notified:' .. tag, '1', 'NX', 'PX', math.max(1, math.ceil(retry / 1000))) then
      notify = 0
    end
  end
  out[5 * i - 4] = allowed
  out[5 * i - 3] = remaining
  out[5 * i - 2] = math.ceil(reset / 1000)
  out[5 * i - 1] = math.ceil(retry / 1000)
  out[5 * i] = notify
end
return out
