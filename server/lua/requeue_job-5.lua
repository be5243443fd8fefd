--[[
  Puts a held job back in its queue (failed with attempts left, lease ran out, node lost, model not
  available, claim released): compare-and-set on the state (and version, when given), fenced by
  node + lease token when given. With a backoff the job waits in the timers zset first; otherwise it
  is queued at once, ahead of younger jobs of its priority. A released claim gives its attempt back.

  Input:
    KEYS[1] job fsm hash (the record and its state changes)
    KEYS[2] partition queue zset
    KEYS[3] partition timers zset
    KEYS[4] partition queued counts hash (the job is counted in now's second, in backoff too:
            keys.PartitionKeys.queued; the record's `updated` tells which)
    KEYS[5] partition held zset (the job leaves it)
    ARGV[1] job id
    ARGV[2] event (FSM trigger)
    ARGV[3] destination state (decided by the FSM)
    ARGV[4] expected version, "" for any
    ARGV[5] fence: node id, "" for none
    ARGV[6] fence: lease token, "" for none
    ARGV[7] backoff, ms (0: queue at once)
    ARGV[8] error code ("" keeps the last error)
    ARGV[9] error message
    ARGV[10] error retryable, "0" or "1"
    ARGV[11] "1": the job avoids its current node from now on
    ARGV[12] guard: "" none; "lease": only if the lease ran out
    ARGV[13] wake-up channel
    ARGV[14] "1": give the attempt back (the claim never reached its node)

  Output:
    {1, state, version, from}  applied; from is the state it left
    {0, state, version}   a repeat of the event already applied (same token); nothing changed
    {-1}                  job not found
    {-2, state}           invalid transition from the current state
    {-3, version}         version mismatch
    {-4, attempt}         stale lease (another claim's token)
    {-5, node}            held by another node
    {-10}                 guard: the lease has not run out
]]
local fsmKey, queueKey, timersKey, queuedKey, heldKey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local jobId, event, dest = ARGV[1], ARGV[2], ARGV[3]

local f = rcall("HMGET", fsmKey, "state", "ver", "att", "node", "lease", "qs", "avoid", "ev", "tok", "w", "c")
local state = f[1]
if not state then
  return {-1}
end
local tok = f[9] or ""  -- a record written before lease tokens has none
if ARGV[6] ~= "" and tok ~= ARGV[6] then
  return {-4, tonumber(f[3])}
end
local node = f[4] or ""  -- a queued job that never had a node has no `node`
if ARGV[5] ~= "" and node ~= ARGV[5] then
  return {-5, node}
end
if state == dest and is_repeat(state, f[8], event) then
  return {0, state, tonumber(f[2])}
end
if not allowed(event, state) then
  return {-2, state}
end
if ARGV[4] ~= "" and f[2] ~= ARGV[4] then
  return {-3, tonumber(f[2])}
end
local now = now_ms()
local lease = tonumber(f[5]) or 0  -- no `lease`: never claimed
if ARGV[12] == "lease" and (lease == 0 or lease > now) then
  return {-10}
end

local version = tonumber(f[2]) + 1
local attempt = tonumber(f[3])
if ARGV[14] == "1" then
  attempt = attempt - 1
end
local avoid = f[7] or ","  -- none until a requeue writes it
if ARGV[11] == "1" and not string.find(avoid, "," .. node .. ",", 1, true) then
  avoid = avoid .. node .. ","
end
local created = f[11] or rcall("HGET", fsmKey, "created")  -- `created`: a record an earlier version wrote
local change = record_event(fsmKey, f[10], created, {s = dest, v = version, a = attempt, n = node,
  e = event, t = now, ec = ARGV[8], em = ARGV[9], er = ARGV[10]})
if ARGV[8] ~= "" then  -- the last error is that of this change (its `h<version>`): GetJob's last_error
  change[#change + 1], change[#change + 2] = "err", version
end
rcall("HSET", fsmKey, "state", dest, "ver", version, "ev", event, "att", attempt, "lease", 0,
  "updated", now, "avoid", avoid, unpack(change))
rcall("ZREM", timersKey, lease_member(jobId, tok))
rcall("ZREM", heldKey, jobId)
count_queued(queuedKey, now, 1)
local backoff = tonumber(ARGV[7])
if backoff > 0 then
  rcall("ZADD", timersKey, now + backoff, retry_member(jobId))
else
  rcall("ZADD", queueKey, f[6], jobId)
  rcall("PUBLISH", ARGV[13], wake_message(jobId, "", f[6]))
end
return {1, dest, version, state}
