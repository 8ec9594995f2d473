-- A Redis Cluster's tenant budget, second phase: gives back the units a message reserved
-- in its tenant's budget (composed.lua, called on the budget alone, with a reservation id)
-- when the rest of its limits, decided in another slot, did not let it through. The
-- reservation's record (the budget's decisions by id, {base}:all:seen) says when its
-- window ends; units go back only to that same window, and a token bucket only when no
-- message moved it since, so a refund can never let a message past a limit. The record is
-- removed, so a reservation is given back once.
--
-- KEYS[2i-1]    a budget's state (as composed.lua keeps it)
-- KEYS[2i]      its decisions by id ({base}:all:seen)
-- ARGV[5i-4..5i]  its algorithm ("f", "s" or "b"), the units to give back, requests,
--               window in milliseconds, and the reservation's id
-- Returns       the number of reservations given back; one whose window has passed, whose
--               record is gone, or whose key holds something else is left alone (the
--               budget then counts units it did not let through, until its window ends).
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now = now_us / 1000
local refunded = 0
for i = 1, #KEYS / 2 do
  pcall(function()
    local key, seen_key = KEYS[2 * i - 1], KEYS[2 * i]
    local algorithm = ARGV[5 * i - 4]
    local cost = tonumber(ARGV[5 * i - 3])
    local requests = tonumber(ARGV[5 * i - 2])
    local window = tonumber(ARGV[5 * i - 1])
    local id = ARGV[5 * i]
    local record = redis.call('HGET', seen_key, id)
    if not record then return end
    -- allowed:decider:remaining:reset_at:retry_at:notify (composed.lua)
    local allowed, reset_at = string.match(record, '^(%d+):%d+:%d+:(%d+):')
    reset_at = tonumber(reset_at)
    if allowed ~= '1' or not reset_at then return end
    redis.call('HDEL', seen_key, id)
    if algorithm == 'f' then
      -- The same window: it still ends when it ended then (to the millisecond).
      local pttl = redis.call('PTTL', key)
      local count = tonumber(redis.call('GET', key) or '')
      if pttl > 0 and count and math.abs(math.floor(now) + pttl - reset_at) <= 2 then
        redis.call('DECRBY', key, math.min(cost, math.max(0, count)))
        refunded = refunded + 1
      end
    elseif algorithm == 's' then
      -- The window the reservation counted in ends at reset_at.
      local index = math.floor(now / window)
      local then_index = math.floor((reset_at - 1) / window)
      local stored = redis.call('HMGET', key, 'index', 'current')
      local current = tonumber(stored[2])
      if index == then_index and tonumber(stored[1]) == index and current then
        redis.call('HSET', key, 'current', math.max(0, current - cost))
        refunded = refunded + 1
      end
    else
      -- Only a bucket no message moved since: its TAT is still the one the reservation
      -- left (reset_at, to the millisecond). Given back, it is as if the reservation had
      -- never been made.
      local tat = tonumber(redis.call('GET', key) or '')
      if tat and math.abs(math.floor(tat / 1000) - reset_at) <= 1 then
        local interval = math.max(1, window * 1000 / requests)
        local new_tat = math.max(now_us, tat - math.floor(cost * interval))
        local px = math.max(1, math.ceil((new_tat - now_us) / 1000))
        redis.call('SET', key, string.format('%.0f', new_tat), 'PX', string.format('%d', px))
        refunded = refunded + 1
      end
    end
  end)
end
return refunded
