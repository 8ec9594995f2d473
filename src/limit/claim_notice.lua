-- Claims the right to tell a sender about a deferring rule's final rejection
-- (`notify = "once_per_window"`), with the marker the check scripts keep (notice.lua, which
-- is prepended to this script).
--
-- KEYS[1]   the state's senders told: {state}:notified
-- ARGV[1]   the sender's tag
-- ARGV[2]   how long the sender counts as told, in milliseconds
-- ARGV[3]   the message id ("" when it has none)
-- Returns   1 when this message is to tell the sender, else 0.
if first_notice(KEYS[1], ARGV[1], redis_now_ms(), tonumber(ARGV[2]), ARGV[3]) then
  return 1
end
return 0
