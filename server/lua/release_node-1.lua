--[[
  Removes a node from the registry when its stream ends, unless a newer stream took over.

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
rcall("DEL", KEYS[1])
return {1}
