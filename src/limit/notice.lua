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

-- A deferring rule's line, {state}:turn: the moment (milliseconds, the script's clock) of
-- the last turn it gave, kept until that message is surely back (the ladder brings a
-- message back up to a second, or a quarter of its wait, after its turn). An over-limit
-- message asks with the tag "~line:{longest wait in ms}" and gets the next turn, a
-- message's share of the window after the one before and not before the key frees, so a
-- burst comes back at the pace the limit lets through, however many windows it spans
-- (the share is window / limit; the sliding window's estimate lets through only
-- limit - 1 per window at a steady pace, so there it is window / (limit - 1)). A turn
-- beyond the longest wait is not given (the message is rejected instead, and takes no
-- place from the ones behind it). A message back at its turn and
-- over the limit again ("~back:{longest wait}": one back late took its place; the
-- ladder's steps are whole seconds) takes a new turn the same way: a turn sooner would be
-- one that another message holds, and they would race for it again and again.
local LINE_LATE_MS = 2000

-- A line's tag: the longest wait a turn may be given (ms), and whether the message is
-- fresh; nil for a notification tag.
local function line_of(tag)
  local kind, longest = string.match(tag, '^~(%a+):(%d+)$')
  if not kind then
    return nil
  end
  return tonumber(longest), kind == 'line'
end

-- The last turn the line gave, or 0. A key of another type (written by hand) is no line
-- rather than a failed check; the next turn replaces it.
local function last_turn(line_key)
  local readable, last = pcall(redis.call, 'GET', line_key)
  return readable and tonumber(last) or 0
end

-- Whether a fresh message finds the line's next turn still ahead: it then joins the line
-- without being counted (first come, first served), rather than take the place one of
-- the messages in it was given.
local function behind_line(line_key, tag, now, share)
  local _, fresh = line_of(tag)
  return fresh and last_turn(line_key) + share > now
end

-- The wait in milliseconds for this message's turn (see above), or nil for a tag that is
-- not a line's.
local function take_turn(line_key, tag, now, free_in, share)
  local longest = line_of(tag)
  if not longest then
    return nil
  end
  local turn = math.max(now + free_in, last_turn(line_key) + share)
  local wait = math.max(0, math.ceil(turn - now))
  if wait <= longest then
    -- Kept to the microsecond: a line of more than a thousand a second stays exact.
    redis.call('SET', line_key, string.format('%.3f', turn), 'PX',
      string.format('%d', wait + math.ceil(wait / 4) + LINE_LATE_MS))
  end
  return wait
end

-- Now in microseconds, for the scripts whose ARGV[1] may carry a clock (tests pass one):
-- that clock, or Redis's when it is "".
local function clock_us()
  if ARGV[1] ~= '' then
    return tonumber(ARGV[1])
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end

-- Now by Redis's clock, in milliseconds.
local function redis_now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
