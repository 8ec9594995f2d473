-- Once-per-window notices, shared by the check scripts and the claim of a deferring rule's
-- final rejection. The senders told about a state's rejections are the fields of one hash,
-- {state}:notified (field: the sender's tag; value: "{until_ms}:{message id}"), so that an
-- operator's reset names it instead of searching the keyspace for one key per sender. A
-- sender counts as told until until_ms (Redis's clock), except by the message that told
-- them (its redelivery is told again: its first notice may never have gone out). The hash
-- lives as long as its longest marker and holds at most NOTIFIED_MAX senders: when full,
-- the senders whose wait is over are removed, and a hash still full of senders within their
-- wait starts afresh, so some of those may be told twice, never none.
local NOTIFIED_MAX = 10000

-- Whether this rejection is the first its sender hears of until now_ms + ttl_ms; records it
-- when it is.
local function first_notice(hash, tag, now_ms, ttl_ms, id)
  ttl_ms = math.max(1, math.ceil(ttl_ms))
  now_ms = math.floor(now_ms)
  -- A key of another type (written by hand) tells everyone rather than fail a check whose
  -- counter was already counted.
  local readable, held = pcall(redis.call, 'HGET', hash, tag)
  if not readable then
    return true
  end
  if held then
    local until_ms, holder = string.match(held, '^(%d+):(.*)$')
    if until_ms and tonumber(until_ms) > now_ms and (id == '' or holder ~= id) then
      return false
    end
  elseif redis.call('HLEN', hash) >= NOTIFIED_MAX then
    -- Full: the senders whose wait is over go first (their expiry was pushed on by later
    -- markers); only a hash still full of live markers starts afresh.
    local fields = redis.call('HGETALL', hash)
    for i = 1, #fields, 2 do
      local until_ms = tonumber(string.match(fields[i + 1], '^(%d+):'))
      if not until_ms or until_ms <= now_ms then
        redis.call('HDEL', hash, fields[i])
      end
    end
    if redis.call('HLEN', hash) >= NOTIFIED_MAX then
      redis.call('DEL', hash)
    end
  end
  redis.call('HSET', hash, tag, string.format('%d:%s', now_ms + ttl_ms, id))
  if redis.call('PTTL', hash) < ttl_ms then
    redis.call('PEXPIRE', hash, ttl_ms)
  end
  return true
end

-- Now by Redis's clock, in milliseconds.
local function redis_now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
