--[[
  A node's ack or heartbeat for a job it holds, fenced by node + attempt: acknowledges an assigned
  job (assigned -> running) and extends the lease; or, on a closed stream, shortens the lease to a
  grace period. The lease never reaches past the start of the attempt + the execution timeout.

  Input:
    KEYS[1] job fsm hash
    KEYS[2] job events list (JSON entries; each is also PUBLISHed on a channel of the same name)
    KEYS[3] partition timers zset
    ARGV[1] job id
    ARGV[2] node id (fence)
    ARGV[3] attempt (fence)
    ARGV[4] lease duration from now, ms
    ARGV[5] mode: "ack" (start and extend) or "shorten" (no state change; the lease only shrinks)
    ARGV[6] state an ack starts from (from the FSM: start's source)
    ARGV[7] state an ack leads to (from the FSM: start's destination)

  Output:
    {1, lease deadline ms, state, version}  acknowledged now (state changed)
    {0, lease deadline ms, state, version}  lease extended or shortened, no state change
    {-1}                       job not found
    {-2, state}                job not held (queued again, or finished)
    {-4, attempt}              stale attempt
    {-5, node}                 held by another node
]]
local rcall = redis.call
local fsmKey, eventsKey, timersKey = KEYS[1], KEYS[2], KEYS[3]
local jobId, nodeId = ARGV[1], ARGV[2]

local f = rcall("HMGET", fsmKey, "state", "ver", "att", "node", "lease", "started", "xto")
local state = f[1]
if not state then
  return {-1}
end
if f[3] ~= ARGV[3] then
  return {-4, tonumber(f[3])}
end
if f[4] ~= nodeId then
  return {-5, f[4]}
end
if state ~= ARGV[6] and state ~= ARGV[7] then
  return {-2, state}
end

local t = rcall("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local version = tonumber(f[2])
local started = tonumber(f[6])
local code = 0
local lease = now + tonumber(ARGV[4])
if ARGV[5] == "shorten" then
  lease = math.min(lease, tonumber(f[5]))
elseif state == ARGV[6] then
  code = 1
  state = ARGV[7]
  version = version + 1
  started = now
  rcall("HSET", fsmKey, "state", state, "ver", version, "ev", "start", "started", now, "updated", now)
  local entry = cjson.encode({s = state, v = version, a = tonumber(f[3]), n = nodeId, e = "start", t = now})
  rcall("RPUSH", eventsKey, entry)
  rcall("PUBLISH", eventsKey, entry)
end
local xto = tonumber(f[7])
if started > 0 and xto > 0 then
  lease = math.min(lease, started + xto)
end
rcall("HSET", fsmKey, "lease", lease)
rcall("ZADD", timersKey, lease, "l:" .. jobId)
return {code, lease, state, version}
