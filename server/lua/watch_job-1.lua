--[[
  WatchJob's first read: marks the job watched (`w`: from now on the scripts publish its state changes on
  its channel) and returns its record, spec and state changes, in one step, so that every change is either
  in what this returns or published after it (the caller subscribed to the channel before). A job in a
  state no event leaves (succeeded, cancelled) is not marked: nothing will change.

  Input:
    KEYS[1] job fsm hash

  Output:
    the record as HGETALL gives it (field, value, ...) before `w` was set; {} when the job is not found
]]
local fsmKey = KEYS[1]
local record = rcall("HGETALL", fsmKey)
for i = 1, #record, 2 do
  if record[i] == "state" then
    for event in pairs(SOURCES) do
      if allowed(event, record[i + 1]) then
        rcall("HSET", fsmKey, "w", 1)
        break
      end
    end
    break
  end
end
return record
