-- A Redis Cluster's tenant budget, second phase: gives back units a message reserved in its
-- tenant's budget (composed.lua, called on the budget alone) when the rest of its limits,
-- decided in another slot, did not let it through (or replayed an earlier decision). A
-- unit is given back only to the window it was taken from: a window that started since
-- keeps its count, so a late refund can never let a message past a fresh window's limit.
--
-- KEYS[i]       a budget's state (as composed.lua keeps it)
-- ARGV[5i-4..5i]  its algorithm ("f", "s" or "b"), the units to give back, requests,
--               window in milliseconds, and the milliseconds the window had left when
--               the units were taken (composed.lua's reset)
-- Returns       the number of budgets given their units back; a key that changed its
--               window, is gone, or holds something else is left alone.
local t = redis.call('TIME')
local now_us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now = now_us / 1000
local refunded = 0
for i, key in ipairs(KEYS) do
  local ok = pcall(function()
    local algorithm = ARGV[5 * i - 4]
    local cost = tonumber(ARGV[5 * i - 3])
    local requests = tonumber(ARGV[5 * i - 2])
    local window = tonumber(ARGV[5 * i - 1])
    local reset_then = tonumber(ARGV[5 * i])
    if algorithm == 'f' then
      -- The same window: its expiry has only come nearer since.
      local pttl = redis.call('PTTL', key)
      local count = tonumber(redis.call('GET', key) or '')
      if pttl > 0 and pttl <= reset_then and count then
        redis.call('DECRBY', key, math.min(cost, math.max(0, count)))
        refunded = refunded + 1
      end
    elseif algorithm == 's' then
      local index = math.floor(now / window)
      local elapsed = now - index * window
      local stored = redis.call('HMGET', key, 'index', 'current')
      local current = tonumber(stored[2])
      if tonumber(stored[1]) == index and current and window - elapsed <= reset_then then
        redis.call('HSET', key, 'current', math.max(0, current - cost))
        refunded = refunded + 1
      end
    else
      local tat = tonumber(redis.call('GET', key) or '')
      if tat and tat > now_us then
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
