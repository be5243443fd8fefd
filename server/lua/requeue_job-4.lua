--[[
  Puts a held job back in its queue (failed with attempts left, lease ran out, node lost, model not
  available): compare-and-set on the state (and version, when given), fenced by node + attempt when
  given. With a backoff the job waits in the timers zset first; otherwise it is queued at once, ahead
  of younger jobs of its priority.

  Input:
    KEYS[1] job fsm hash
    KEYS[2] job events list (JSON entries; each is also PUBLISHed on a channel of the same name)
    KEYS[3] partition queue zset
    KEYS[4] partition timers zset
    ARGV[1] job id
    ARGV[2] event (FSM trigger)
    ARGV[3] states the event may fire from, as ",a,b," (from the FSM)
    ARGV[4] destination state (decided by the FSM)
    ARGV[5] expected version, "" for any
    ARGV[6] fence: node id, "" for none
    ARGV[7] fence: attempt, "" for none
    ARGV[8] backoff, ms (0: queue at once)
    ARGV[9] error code
    ARGV[10] error message
    ARGV[11] error retryable, "0" or "1"
    ARGV[12] "1": the job avoids its current node from now on
    ARGV[13] guard: "" none; "lease": only if the lease ran out
    ARGV[14] wake-up channel

  Output:
    {1, state, version}   applied
    {0, state, version}   already requeued by the same event and token; nothing changed
    {-1}                  job not found
    {-2, state}           invalid transition from the current state
    {-3, version}         version mismatch
    {-4, attempt}         stale attempt
    {-5, node}            held by another node
    {-10}                 guard: the lease has not run out
]]
local rcall = redis.call
local fsmKey, eventsKey, queueKey, timersKey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local jobId, event, dest = ARGV[1], ARGV[2], ARGV[4]

local f = rcall("HMGET", fsmKey, "state", "ver", "att", "node", "lease", "qs", "avoid", "ev")
local state = f[1]
if not state then
  return {-1}
end
if ARGV[7] ~= "" and f[3] ~= ARGV[7] then
  return {-4, tonumber(f[3])}
end
if ARGV[6] ~= "" and f[4] ~= ARGV[6] then
  return {-5, f[4]}
end
if state == dest and f[8] == event then
  return {0, state, tonumber(f[2])}
end
if not string.find(ARGV[3], "," .. state .. ",", 1, true) then
  return {-2, state}
end
if ARGV[5] ~= "" and f[2] ~= ARGV[5] then
  return {-3, tonumber(f[2])}
end
local t = rcall("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lease = tonumber(f[5])
if ARGV[13] == "lease" and (lease == 0 or lease > now) then
  return {-10}
end

local version = tonumber(f[2]) + 1
local avoid = f[7]
if ARGV[12] == "1" and not string.find(avoid, "," .. f[4] .. ",", 1, true) then
  avoid = avoid .. f[4] .. ","
end
rcall("HSET", fsmKey, "state", dest, "ver", version, "ev", event, "lease", 0, "updated", now,
  "avoid", avoid, "ecode", ARGV[9], "emsg", ARGV[10], "eretry", ARGV[11])
rcall("ZREM", timersKey, "l:" .. jobId)
local backoff = tonumber(ARGV[8])
if backoff > 0 then
  rcall("ZADD", timersKey, now + backoff, "r:" .. jobId)
else
  rcall("ZADD", queueKey, f[6], jobId)
  rcall("PUBLISH", ARGV[14], jobId .. " ")
end
local entry = cjson.encode({s = dest, v = version, a = tonumber(f[3]), n = f[4], e = event, t = now,
  ec = ARGV[9], em = ARGV[10], er = ARGV[11]})
rcall("RPUSH", eventsKey, entry)
rcall("PUBLISH", eventsKey, entry)
return {1, dest, version}
