--[[
  Marks a job watched (`w`: from now on the scripts publish its state changes on its channel), unless it
  is in a state no event leaves (succeeded, cancelled: nothing will change, and reading writes nothing).
  WatchJob subscribes to the channel first, then sends this and an HGETALL of the record in one pipeline,
  in that order: every change is in what the HGETALL reads or published after this ran (a change in
  between is both: the watcher skips the versions it has sent). Returning the record from here would
  cost its conversion to Lua and back (about twice the Redis CPU of the read).

  Input:
    KEYS[1] job fsm hash

  Output:
    1   marked
    0   not: no such job, or a state no event leaves
]]
local fsmKey = KEYS[1]
local state = rcall("HGET", fsmKey, "state")
if state and string.find(SOURCES, ":" .. state .. " ", 1, true) then  -- some event fires from it
  rcall("HSET", fsmKey, "w", 1)
  return 1
end
return 0
