--[[
  Records a drain request in a node's registry entry (DrainNode): the instance holding its stream is
  told over the node's channel, and whichever instance registers or renews the entry before the
  request's deadline drains the stream too (lua/register_node-1.lua), so a lost message or a
  reconnection elsewhere changes nothing. The request ends at its deadline: a node restarted after it
  serves again (a supervisor's quick restarts are drained until then, not for ever).

  Input:
    KEYS[1] node hash
    ARGV[1] how long the request holds, ms (the registry's node TTL)

  Output:
    {1}  recorded
    {0}  no such node registered (no entry, or one no stream holds)
]]
if (rcall("HGET", KEYS[1], "session") or "") == "" then
  return {0}
end
rcall("HSET", KEYS[1], "drainreq", now_ms() + tonumber(ARGV[1]), "draining", 1)
return {1}
