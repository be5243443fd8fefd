--[[
  Removes a node from the registry when its stream ends, unless a newer stream took over. An entry
  with a drain request (DrainNode) stays, held by no stream, until the request's deadline (no longer):
  the node, reconnecting before then on any instance, is drained again.

  Input:
    KEYS[1] node hash
    ARGV[1] session token of the ending stream

  Output:
    {1}   removed (or already gone)
    {-5}  another stream of this node id holds it now; left alone
]]
local current = rcall("HGET", KEYS[1], "session")
if current and current ~= ARGV[1] then
  return {-5}
end
local drainUntil = tonumber(rcall("HGET", KEYS[1], "drainreq") or "")
if drainUntil and now_ms() < drainUntil then
  rcall("HSET", KEYS[1], "session", "")
  rcall("PEXPIREAT", KEYS[1], drainUntil)
  return {1}
end
rcall("DEL", KEYS[1])
return {1}
