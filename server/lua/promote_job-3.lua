--[[
  Moves a queued job whose retry backoff has passed from the timers zset into its queue.

  Input:
    KEYS[1] job fsm hash
    KEYS[2] partition queue zset
    KEYS[3] partition timers zset
    ARGV[1] job id
    ARGV[2] wake-up channel
    ARGV[3] the queued state (from the FSM)

  Output:
    {1}          queued
    {-1}         job not found (its timer is dropped)
    {-2, state}  job no longer queued (its timer is dropped)
    {-10}        no retry timer due for this job
]]
local rcall = redis.call
local fsmKey, queueKey, timersKey = KEYS[1], KEYS[2], KEYS[3]
local jobId = ARGV[1]
local member = "r:" .. jobId

local due = rcall("ZSCORE", timersKey, member)
local t = rcall("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if not due or tonumber(due) > now then
  return {-10}
end
local f = rcall("HMGET", fsmKey, "state", "qs")
if not f[1] then
  rcall("ZREM", timersKey, member)
  return {-1}
end
if f[1] ~= ARGV[3] then
  rcall("ZREM", timersKey, member)
  return {-2, f[1]}
end
rcall("ZADD", queueKey, f[2], jobId)
rcall("ZREM", timersKey, member)
rcall("PUBLISH", ARGV[2], jobId .. " ")
return {1}
