-- The gate confirmed the output of these decisions: a later replay of one of them is a
-- duplicate of a message downstream already has (replayed = 2 in the check scripts), and
-- a replayed rejection needs no second reply to the user.
--
-- KEYS[i]   where the decision is kept: the fixed window's {counter}:seen hash, or the
--           other algorithms' {key}:seen-at:{id} string
-- ARGV[i]   the message id (the hash field) for a hash, "" for a string
-- Returns   the number of decisions marked. A key that is gone or of another type is
--           skipped: the mark only ever makes a replay more precise.
local marked = 0
for i, key in ipairs(KEYS) do
  pcall(function()
    local id = ARGV[i]
    local v
    if id == '' then v = redis.call('GET', key) else v = redis.call('HGET', key, id) end
    if v and string.sub(v, -2) ~= ':f' then
      if id == '' then
        redis.call('SET', key, v .. ':f', 'KEEPTTL')
      else
        redis.call('HSET', key, id, v .. ':f')
      end
      marked = marked + 1
    end
  end)
end
return marked
