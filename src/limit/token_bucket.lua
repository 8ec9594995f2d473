-- Token bucket as GCRA (generic cell rate algorithm): one stored number per key, the
-- theoretical arrival time (TAT) of the next message. A message is allowed when it does
-- not arrive earlier than TAT - burst * interval; then TAT moves one interval on. Exact
-- and smooth: `requests` per window on average, up to `burst` at once.
--
-- KEYS[i]       the TAT key ({key_prefix}{tenant_id}:ratelimit:{channel}:bucket)
-- ARGV[1]       the time in microseconds, or "" to use Redis's clock (tests pass a clock)
-- ARGV[5i-3] .. ARGV[5i+1]  requests, window in milliseconds, burst, the sender's
--               notification tag ("" to notify every rejection), and the message id
--               ("" when it has none) for KEYS[i]. A message with an id is counted once:
--               a redelivery within the window gets the first decision back.
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
  local requests = tonumber(ARGV[5 * i - 3])
  local window_us = tonumber(ARGV[5 * i - 2]) * 1000
  local burst = tonumber(ARGV[5 * i - 1])
  local tag = ARGV[5 * i]
  local id = ARGV[5 * i + 1]
  local seen_key = key .. ':seen:' .. id
  local seen = nil
  if id ~= '' then seen = redis.call('GET', seen_key) end
  if seen then
    local j = 0
    for value in string.gmatch(seen, '[^:]+') do
      out[5 * i - 4 + j] = tonumber(value)
      j = j + 1
    end
  else
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
    if id ~= '' then
      redis.call('SET', seen_key, table.concat({out[5 * i - 4], out[5 * i - 3], out[5 * i - 2], out[5 * i - 1], out[5 * i]}, ':'), 'PX', math.ceil(window_us / 1000))
    end
  end
end
return out
