--[[
  Removes a due timer whose job refused the transition it stands for (the job is gone or moved on), only
  while it is still due: a timer put back meanwhile with a later time (a RetryJob gives a job a new deadline
  timer under the same member) stays. A plain ZREM after the refusal would take that one too.

  Input:
    KEYS[1] the timers zset
    ARGV[1] the member

  Output:
    1 removed, 0 not there or not due (left alone)
]]
local score = rcall("ZSCORE", KEYS[1], ARGV[1])
if score and tonumber(score) <= now_ms() then
  return rcall("ZREM", KEYS[1], ARGV[1])
end
return 0
