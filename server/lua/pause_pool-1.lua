--[[
  Pauses or resumes one partition of a pool (PausePool / ResumePool call it for every partition):
  while the partition's paused hash exists, lua/claim_job-n.lua claims nothing from it. Idempotent:
  pausing a paused partition keeps when it was paused (and its reason, unless a new one is given).

  Input:
    KEYS[1] partition paused hash (reason, at)
    ARGV[1] "pause" or "resume"
    ARGV[2] reason ("" keeps the one recorded)

  Output:
    {1, reason, at ms}  paused
    {0}                 not paused (resumed)
]]
local pausedKey = KEYS[1]
if ARGV[1] == "resume" then
  rcall("DEL", pausedKey)
  return {0}
end
rcall("HSETNX", pausedKey, "at", now_ms())
if ARGV[2] ~= "" then
  rcall("HSET", pausedKey, "reason", ARGV[2])
else
  rcall("HSETNX", pausedKey, "reason", "")
end
local f = rcall("HMGET", pausedKey, "reason", "at")
return {1, f[1], tonumber(f[2])}
