--[[
  Registers (or renews) a node in the registry. The newest stream of a node id wins: registering
  with a new session token replaces the old one; renewing with a replaced token fails.

  Input:
    KEYS[1] node hash
    ARGV[1] session token of the stream
    ARGV[2] "register" (take over) or "renew" (only while the token is still ours)
    ARGV[3] time to live, ms
    ARGV[4..] field, value pairs to set

  Output:
    {1, previous token or ""}  registered or renewed
    {-5, current token}        renew refused: another stream of this node id took over
]]
local rcall = redis.call
local nodeKey = KEYS[1]
local current = rcall("HGET", nodeKey, "session") or ""
if ARGV[2] == "renew" and current ~= ARGV[1] then
  return {-5, current}
end
local t = rcall("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
rcall("HSET", nodeKey, "session", ARGV[1], "seen", now, unpack(ARGV, 4))
rcall("PEXPIRE", nodeKey, ARGV[3])
return {1, current}
