--[[
  Records a drain request in a node's registry entry (DrainNode): the instance holding its stream is
  told over the node's channel, and whichever instance registers or renews the entry later drains the
  stream too (lua/register_node-1.lua), so a lost message or a reconnection elsewhere changes nothing.

  Input:
    KEYS[1] node hash

  Output:
    {1}  recorded
    {0}  no such node registered
]]
if rcall("EXISTS", KEYS[1]) == 0 then
  return {0}
end
rcall("HSET", KEYS[1], "drainreq", 1, "draining", 1)
return {1}
