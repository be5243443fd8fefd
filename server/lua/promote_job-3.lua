--[[
  Moves a queued job whose retry backoff has passed from the timers zset into its queue.

  Input:
    KEYS[1] job fsm hash
    KEYS[2] partition queue zset
    KEYS[3] partition timers zset
    ARGV[1] job id
    ARGV[2] wake-up channel

  Output:
    {1}          queued
    {-1}         job not found (its timer is dropped)
    {-2, state}  job no longer queued (its timer is dropped)
    {-10}        no retry timer due for this job
]]
local fsmKey, queueKey, timersKey = KEYS[1], KEYS[2], KEYS[3]
local jobId = ARGV[1]
local member = retry_member(jobId)

local due = rcall("ZSCORE", timersKey, member)
if not due or tonumber(due) > now_ms() then
  return {-10}
end
local f = rcall("HMGET", fsmKey, "state", "qs")
if not f[1] then
  rcall("ZREM", timersKey, member)
  return {-1}
end
if f[1] ~= S.queued then
  rcall("ZREM", timersKey, member)
  return {-2, f[1]}
end
rcall("ZADD", queueKey, f[2], jobId)
rcall("ZREM", timersKey, member)
rcall("PUBLISH", ARGV[2], wake_message(jobId, "", f[2]))
return {1}
