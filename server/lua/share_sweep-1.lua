--[[
  An instance's sign of life, and the live instances that share the shards' sweeping.

  Input:
    KEYS[1] instances zset (instance id -> last sign of life, ms)
    ARGV[1] this instance's id
    ARGV[2] how long an instance counts as live after its last sign, ms
    ARGV[3] "1": record this sign of life; "0": leave (this instance stops: the others take over at once)

  Output: the live instance ids, sorted (this one included unless it is leaving)
]]
local now = now_ms()
local since = now - tonumber(ARGV[2])
if ARGV[3] == "1" then
  rcall("ZADD", KEYS[1], now, ARGV[1])
else
  rcall("ZREM", KEYS[1], ARGV[1])
end
rcall("ZREMRANGEBYSCORE", KEYS[1], "-inf", "(" .. since)
local live = rcall("ZRANGE", KEYS[1], 0, -1)
table.sort(live)
return live
