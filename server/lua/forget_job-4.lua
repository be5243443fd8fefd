--[[
  Takes a finished job out of ListJobs' indexes when its keys expire: run by the sweeper for the job's
  forget timer (`x:<job id> <tenant> <ended state or ->`, set by lua/finish_job-n.lua at max(finish,
  deadline) + retention). The member carries what the forget needs: the record is gone by then. Acts
  only if it removes the timer itself, so two sweepers firing the same timer act once, and a RetryJob
  in between (which removes the timer, lua/retry_job-12.lua) keeps the entries.

  Input:
    KEYS[1] partition timers zset (the shard's)
    KEYS[2] partition jobs index (ListJobs by pool)
    KEYS[3] tenant jobs index of the shard
    KEYS[4] the shard's index of jobs ended in the timer's state (read only for an ended state: the
            name for "-" is never written)
    ARGV[1] the forget timer member
    ARGV[2] job id
    ARGV[3] the timer's ended state, or "-" (NOT_ENDED_INDEXED: the job is in no ended index)

  Output:
    1  the job left the indexes
    0  the timer was gone already (another sweeper, or a RetryJob); nothing changed
    -10  not due by Redis' clock (a sweeper whose own clock runs ahead); nothing changed
]]
local due = tonumber(rcall("ZSCORE", KEYS[1], ARGV[1]))
if not due then
  return 0
end
if due > now_ms() then  -- TIME is the only clock: the record has not expired yet
  return -10
end
rcall("ZREM", KEYS[1], ARGV[1])
local member = index_member(ARGV[2])
rcall("ZREM", KEYS[2], member)
rcall("ZREM", KEYS[3], member)
if ARGV[3] ~= NOT_ENDED_INDEXED then
  rcall("ZREM", KEYS[4], member)
end
return 1
