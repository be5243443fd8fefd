--[[
  Removes a deadline timer whose job refused the expiry (the job is gone or finished), unless the job lives
  again: a RetryJob between the refusal and this call put it back in its queue with a new deadline timer
  under the same member, which a plain ZREM would take away. The record decides, not a clock.

  Input:
    KEYS[1] the timers zset
    KEYS[2] the job's fsm hash (its record)
    ARGV[1] the member

  Output:
    1 removed, 0 kept (the job lives) or not there
]]
local f = rcall("HMGET", KEYS[2], "c", "state")
if f[1] and allowed(E.expire, f[2] or S.queued) then
  return 0  -- alive: its deadline still applies (a record with no state yet is queued)
end
return rcall("ZREM", KEYS[1], ARGV[1])
