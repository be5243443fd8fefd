--[[
  Reads a node's registry entry and how long ago it was last registered or renewed, by the clock of
  the Redis server that holds it (so ListNodes compares no clocks of different machines).

  Input:
    KEYS[1] node hash

  Output:
    {}                              no entry (never registered, released, or expired)
    {age ms, field, value, ...}     the entry's fields; age is -1 when it has no "seen" field (0
                                    when the clock went back since)
]]
local nodeKey = KEYS[1]
local entry = rcall("HGETALL", nodeKey)
if #entry == 0 then
  return {}
end
local seen = tonumber(rcall("HGET", nodeKey, "seen"))
local age = -1
if seen then
  age = math.max(0, now_ms() - seen)
end
return {age, unpack(entry)}
