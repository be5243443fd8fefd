--[[
  Folds the earlier versions' waiting zset of a partition (job id -> when it entered QUEUED, ms) into
  its queued counts (keys.PartitionKeys.queued: second -> jobs), a chunk at a time: each instance runs
  it at start, before it serves (server/rates.py: fold_waiting), so no job counted in the zset leaves
  QUEUED through this version's scripts before it is counted in the hash. The entries folded leave
  the zset in the same call: a repeat (another instance starting) folds nothing twice.

  Input:
    KEYS[1] partition waiting zset (keys.waiting_before)
    KEYS[2] partition queued counts hash
    ARGV[1] how many entries to fold in this call (the lowest)

  Output: {entries folded now, entries the zset still holds (0: done, and the key is gone)}
]]
local waitingKey, queuedKey = KEYS[1], KEYS[2]
local n = tonumber(ARGV[1])

local entries = rcall("ZRANGE", waitingKey, 0, n - 1, "WITHSCORES")
local counts = {}
for i = 2, #entries, 2 do
  local second = fmt(math.floor(tonumber(entries[i]) / 1000))
  counts[second] = (counts[second] or 0) + 1
end
for second, count in pairs(counts) do
  rcall("HINCRBY", queuedKey, second, count)
end
if #entries > 0 then
  rcall("ZREMRANGEBYRANK", waitingKey, 0, #entries / 2 - 1)
end
return {#entries / 2, rcall("ZCARD", waitingKey)}
