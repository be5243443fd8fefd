--[[
  Registers (or renews) a node in the registry. The newest stream of a node id wins: registering
  with a new session token replaces the old one; renewing with a replaced token fails. Renewing a
  node whose entry is gone (it expired, e.g. during a Redis outage longer than the TTL) takes it
  back: nobody replaced the stream. A drain request (lua/drain_node-1.lua) stays with the entry until
  its deadline: a stream registering or renewing it before then is told to drain; after it, the
  request is dropped and the node serves again.

  Input:
    KEYS[1] node hash
    ARGV[1] session token of the stream
    ARGV[2] "register" (take over) or "renew" (only while the token is still ours, or nobody's)
    ARGV[3] time to live, ms
    ARGV[4..] field, value pairs to set

  Output:
    {1, previous token or "", drain}  registered or renewed; drain 1 when DrainNode asked for the node
    {-5, current token}        renew refused: another stream of this node id took over
]]
local nodeKey = KEYS[1]
local f = rcall("HMGET", nodeKey, "session", "drainreq")  -- one read: a renewal of 5,000 nodes every 10 s
local current = f[1] or ""
if ARGV[2] == "renew" and current ~= ARGV[1] and current ~= "" then
  return {-5, current}
end
local now = now_ms()
rcall("HSET", nodeKey, "session", ARGV[1], "seen", now, unpack(ARGV, 4))
rcall("PEXPIRE", nodeKey, ARGV[3])
local drainUntil = tonumber(f[2] or "")
if drainUntil then
  if now < drainUntil then
    rcall("HSET", nodeKey, "draining", 1)
    return {1, current, 1}
  end
  rcall("HDEL", nodeKey, "drainreq")
end
return {1, current, 0}
