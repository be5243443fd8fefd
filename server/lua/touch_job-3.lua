--[[
  A node's ack or heartbeat for a job it holds, fenced by node + lease token: acknowledges an
  assigned job (start: assigned -> running) and extends the lease; or, on a closed stream, shortens
  the lease to a grace period. The lease never reaches past the start of the attempt + the execution
  timeout.

  Input:
    KEYS[1] job fsm hash (the record and its state changes)
    KEYS[2] partition timers zset
    KEYS[3] partition held zset (job id -> 0 while assigned, 1 while running: rescored on an ack)
    ARGV[1] job id
    ARGV[2] node id (fence)
    ARGV[3] lease token (fence)
    ARGV[4] lease duration from now, ms
    ARGV[5] mode: "ack" (start and extend) or "shorten" (no state change; the lease only shrinks)

  Output:
    {1, lease deadline ms, state, version}  acknowledged now (state changed)
    {0, lease deadline ms, state, version}  lease extended or shortened, no state change
    {-1}                       job not found
    {-2, state}                job not held (queued again, or finished)
    {-4, attempt}              stale lease (another claim's token)
    {-5, node}                 held by another node
]]
local fsmKey, timersKey, heldKey = KEYS[1], KEYS[2], KEYS[3]
local jobId, nodeId, token = ARGV[1], ARGV[2], ARGV[3]

local f = rcall("HMGET", fsmKey, "state", "ver", "att", "node", "lease", "started", "xto", "tok", "w", "c")
local state = f[1]
if not state then
  return {-1}
end
if f[8] ~= token then
  return {-4, tonumber(f[3])}
end
if f[4] ~= nodeId then
  return {-5, f[4]}
end
local acking = allowed(E.start, state)
if not acking and state ~= FIXED[E.start] then
  return {-2, state}
end

local now = now_ms()
local version = tonumber(f[2])
-- `started` is the running attempt's (its ack's time): an older attempt's, left in the record, says nothing
-- while the job is assigned (a claim does not clear it), and a record never acked has none.
local started = state == FIXED[E.start] and tonumber(f[6]) or 0
local code = 0
local lease = now + tonumber(ARGV[4])
local xto = tonumber(f[7])
if ARGV[5] == "shorten" then
  lease = math.min(lease, tonumber(f[5]))
elseif acking then
  code = 1
  state = FIXED[E.start]
  version = version + 1
  started = now
end
if started > 0 and xto > 0 then
  lease = math.min(lease, started + xto)
end
if code == 1 then  -- the state change and the lease in one HSET
  local created = f[10] or rcall("HGET", fsmKey, "created")  -- `created`: a record an earlier version wrote
  local change = record_event(fsmKey, f[9], created, {s = state, v = version, a = tonumber(f[3]), n = nodeId,
    e = E.start, t = now})
  rcall("HSET", fsmKey, "state", state, "ver", version, "ev", E.start, "started", now, "updated", now,
    "lease", lease, unpack(change))
  rcall("ZADD", heldKey, HELD_SCORE[state], jobId)
else
  rcall("HSET", fsmKey, "lease", lease)
end
rcall("ZADD", timersKey, lease, lease_member(jobId, token))
return {code, lease, state, version}
