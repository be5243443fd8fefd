--[[
  Removes a node from the registry when its stream ends, unless a newer stream took over. An entry
  with a drain request (DrainNode) stays until it expires, held by no stream: the node, reconnecting
  within that time on any instance, is drained again.

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
if rcall("HGET", KEYS[1], "drainreq") then
  rcall("HSET", KEYS[1], "session", "")
  return {1}
end
rcall("DEL", KEYS[1])
return {1}
