--[[
  Claims queued jobs of one partition, each for a node under a lease token chosen by the caller: queued ->
  assigned, attempt + 1, ack lease starts. Repeating a claim with the same token answers the same
  assignment, so a caller that lost the reply claims again with the token to learn what it holds.

  One call for the claims a dispatch pass pairs in a partition (server/store.py groups them): the clock,
  the pause check and the fair clocks are read once, the held and timer entries and the queued counts
  written once; each claim runs on its own (a claim that fails, on a damaged record, is an error reply in
  its place and does not fail the others).

  Input (the key count varies: 8 + 2 per claim, file name `-n`):
    KEYS[1] partition queue zset
    KEYS[2] partition timers zset
    KEYS[3] partition affinity hash (session field -> "<node id>|<ms>")
    KEYS[4] partition affinity times zset (session field -> ms of its binding), to forget old bindings
    KEYS[5] partition fair-share zset (lua/submit_job-n.lua): a claim moves its band's virtual clock
    KEYS[6] partition queued counts hash (a job is counted out of its second: keys.PartitionKeys.queued)
    KEYS[7] partition held zset (job id -> 0 while assigned, 1 while running: the job enters it)
    KEYS[8] partition paused hash: while it exists, nothing is claimed from the partition (PausePool; a
            repeat of a claim is answered still)
    then per claim i (k = 8 + 2 * (i - 1)):
    KEYS[k+1] job fsm hash (the record, its spec and its state changes)
    KEYS[k+2] job payload
    ARGV[1] ack timeout, ms
    ARGV[2] affinity wait, ms: how long a job is held back for its session's preferred node
    ARGV[3] how many queue heads to return as the next candidates
    ARGV[4] avoid window, ms: how long a requeued job keeps away from the nodes it avoids
    ARGV[5] affinity time to live, ms: bindings older than this are deleted (by one claim in 8, and with their
            keys, which expire this long after their newest binding); a claim by
            the node the job prefers leaves a binding younger than an eighth of it as it is (`pat`)
    then per claim i (a = 5 + 3 * (i - 1)):
    ARGV[a+1] job id (a candidate read from the queue earlier)
    ARGV[a+2] node id
    ARGV[a+3] lease token of this claim (unique per claim)

  Output: one reply per claim, in order, {code, next candidates, ...}; the candidates are the queue's heads
  with their scores after the call's claims, {id, score, id, score, ...} (the dispatcher pairs jobs in queue
  order), once, in the last reply that is not an error (read after every claim; the others carry {}),
  and in none when that reply is -14 (paused)
    {1, candidates, attempt, lease deadline ms, spec, payload, queued ms, dispatch ms}  claimed now:
                             queued ms is how long the job was queued (since it entered queued);
                             dispatch ms the time since submit for the job's first claim, -1 after
    {1, candidates, attempt, lease deadline ms, spec, payload}  claimed by this token before (a repeat)
    {-1, candidates}         job not found (its queue entry is dropped)
    {-2, candidates, state}  job not in a claimable state (its queue entry is dropped)
    {-7, candidates}         job no longer in the queue (someone else claimed it), or this token's
                             claim was released or expired already (a token is good for one claim)
    {-8, candidates, until}  the job avoids this node until `until` (ms): the node lost it or lacked the model
    {-9, candidates, until}  the job is held back for its session's node until `until` (ms)
    {-14, {}}                the pool is paused (no candidates: the dispatcher waits for ResumePool)
]]

local queueKey, timersKey, affinityKey, affinityAtKey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local fairKey, queuedKey, heldKey, pausedKey = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local n = (#KEYS - 8) / 2
local out = {}
local paused = rcall("EXISTS", pausedKey) == 1  -- a repeat of a claim is still answered (its job is out already)
local now = now_ms()
-- Numbers are given to Redis as integer strings, made once where they can be: a Lua number given to
-- redis.call is printed by Redis 7.0's Lua bridge with "%.17g" (glibc's multi-precision printf, and Lua's
-- own `..` with "%.14g"), several times the CPU of "%d".
local nowS = string.format("%d", now)
local ackMs, holdMs, avoidMs, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[4]), tonumber(ARGV[5])
local claimedTo = {}  -- band -> the highest queue score (pass) the call's claims took from it
local held, timers, counted = {}, {}, {}  -- written once after the claims: held and timer entries, queued counts
local sampled = 0  -- claims whose token says "clean the stale bindings"
local bound = false  -- a binding was written: both affinity keys live a time to live from now (below)

local NONE = {}  -- the candidates of every reply but the call's last (below)

local function claim(fsmKey, payloadKey, jobId, nodeId, token)
  local function payload(f)  -- "" for a job submitted without one (`np`: no key to read)
    return not f[15] and rcall("GET", payloadKey) or ""
  end
  local f = rcall("HMGET", fsmKey, "state", "ver", "att", "avoid", "pref", "updated", "sess", "node", "tok", "lease",
    "c", "asg", "w", "qs", "np", "pat", unpack(SPEC_FIELDS))
  local state = f[1]
  if f[9] == token then  -- a repeat of this claim: the same assignment while it holds, else nothing
    if state == FIXED[E.assign] and f[8] == nodeId then
      return {1, NONE, tonumber(f[3]), tonumber(f[10]), spec_of(fsmKey, f, 17), payload(f)}
    end
    return {-7, NONE}
  end
  if paused then
    return {-14, {}}
  end
  -- Whether the job is still queued: ZREM's reply where the job leaves the queue anyway, a ZSCORE where it
  -- stays (its queue score is the record's `qs`: every ZADD to a queue writes that).
  if not state or not allowed(E.assign, state) then
    if rcall("ZREM", queueKey, jobId) == 0 then
      return {-7, NONE}
    end
    if not state then
      return {-1, NONE}
    end
    return {-2, NONE, state}
  end
  local created = f[11] or rcall("HGET", fsmKey, "created")  -- `created`: a record an earlier version wrote
  local updated = tonumber(f[6] or created)  -- a record not changed since its submit has no `updated`
  local avoidUntil = updated + avoidMs
  local heldUntil = updated + holdMs
  local avoided = f[4] and now < avoidUntil and string.find(f[4], "," .. nodeId .. ",", 1, true)
  local preferred = f[5] and f[5] ~= "" and f[5] ~= nodeId and now < heldUntil
  if (avoided or preferred) and not rcall("ZSCORE", queueKey, jobId) then
    return {-7, NONE}
  elseif avoided then
    return {-8, NONE, avoidUntil}
  elseif preferred then
    return {-9, NONE, heldUntil}
  end
  if rcall("ZREM", queueKey, jobId) == 0 then
    return {-7, NONE}
  end

  local score = tonumber(f[14])
  local dest = FIXED[E.assign]
  local version = tonumber(f[2]) + 1
  local attempt = (tonumber(f[3]) or 0) + 1  -- no `att`: never claimed
  local lease = now + ackMs
  local leaseS = string.format("%d", lease)
  local band = math.floor(score / BAND)  -- the band's virtual clock moves once for the call's claims (below)
  claimedTo[band] = math.max(claimedTo[band] or score, score)
  local change = record_event(fsmKey, f[13], created, {s = dest, v = version, a = attempt, n = nodeId, e = E.assign,
    t = now})
  rcall("HSET", fsmKey, "state", dest, "ver", string.format("%d", version), "ev", E.assign, "att",
    string.format("%d", attempt), "node", nodeId, "tok", token, "lease", leaseS, "updated", nowS, "asg", nowS,
    unpack(change))  -- `started`: see lua/touch_job-3.lua
  -- Counted out of the second it entered QUEUED (`updated`, else its creation); enters the held zset; its
  -- lease timer: all written after the claims, one command each.
  local second = string.format("%d", math.floor(updated / 1000))
  counted[second] = (counted[second] or 0) - 1
  held[#held + 1], held[#held + 2] = HELD_SCORE[dest], jobId
  timers[#timers + 1], timers[#timers + 2] = leaseS, lease_member(jobId, token)
  if string.byte(token, -1) % 8 == 0 then  -- tokens are random hex: one claim in 8 cleans bindings (below)
    sampled = sampled + 1
  end
  -- The session's binding: rewritten unless the job prefers this node and the binding submit read (`pat`:
  -- how old it was then, set only with `pref`) is younger than an eighth of the time to live, so a session
  -- served by its node rewrites it about once per eighth and it never expires while served. (Should another
  -- node have taken the session since the submit, the binding stays with that node: a hint either way.)
  if f[5] ~= nodeId or not f[16] or now - (tonumber(created) - tonumber(f[16])) >= ttl / 8 then
    rcall("HSET", affinityKey, f[7], nodeId .. "|" .. nowS)
    rcall("ZADD", affinityAtKey, nowS, f[7])
    bound = true
  end
  local dispatched = -1  -- "asg" is the time of the job's latest claim: none before, this is its first
  if not f[12] and created then
    dispatched = now - tonumber(created)
  end
  return {1, NONE, attempt, lease, spec_of(fsmKey, f, 17), payload(f), now - updated, dispatched}
end

for i = 1, n do
  local k, a = 8 + 2 * (i - 1), 5 + 3 * (i - 1)
  local ok, reply = pcall(claim, KEYS[k + 1], KEYS[k + 2], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3])
  out[i] = ok and reply or {err = type(reply) == "table" and reply.err or tostring(reply)}
end
-- Fair share: each band's virtual clock (where a tenant that joins starts) moves to the highest pass the
-- call's claims took from it, but no further than the band's head after them (a claim out of turn, e.g. of
-- the job a wake-up names, is not a reason to put the tenants that join later behind the queue). A band left
-- empty evens everyone out: its clock moves to the highest pass handed out. No clock: the key expired (a
-- submit starts it again), nothing to keep. Read and written once per band for the call, not per claim.
local heads  -- the queue's heads after the claims (read at most once)
local function queue_heads()
  heads = heads or rcall("ZRANGE", queueKey, 0, tonumber(ARGV[3]) - 1, "WITHSCORES")
  return heads
end
for band, score in pairs(claimedTo) do
  local clockMember, low = "c" .. band, band * BAND
  local clock = tonumber(rcall("ZSCORE", fairKey, clockMember))
  if clock and score > clock then
    local head = queue_heads()
    local lowest = tonumber(head[2])
    if not lowest or lowest >= low + BAND then
      head = {}  -- the queue's lowest score is past the band: the band is empty
    elseif lowest < low then  -- a band of higher priority comes first
      head = rcall("ZRANGEBYSCORE", queueKey, low, "(" .. fmt(low + BAND), "WITHSCORES", "LIMIT", 0, 1)
    end
    local to = score
    if head[1] then
      to = math.min(score, tonumber(head[2]))
    else
      local top = rcall("ZREVRANGEBYSCORE", fairKey, "(" .. fmt(low + BAND), low, "WITHSCORES", "LIMIT", 0, 1)
      to = math.max(score, tonumber(top[2]))
    end
    if to > clock then
      rcall("ZADD", fairKey, to, clockMember)
    end
  end
end
-- The queue's heads after the claims, once, in the last reply that carries candidates (not on a paused pool).
for i = n, 1, -1 do
  if out[i][2] then
    if out[i][1] ~= -14 then
      out[i][2] = queue_heads()
    end
    break
  end
end
if #held > 0 then
  rcall("ZADD", heldKey, unpack(held))
  rcall("ZADD", timersKey, unpack(timers))
  for second, by in pairs(counted) do
    count_queued(queuedKey, tonumber(second) * 1000, by)
  end
end
-- Bindings past their time to live are ignored (lua/submit_job-n.lua); each claim in 8 deletes up to 128
-- of them (in one command for the call). The keys expire a time to live after their newest binding, so a
-- partition no longer claimed from forgets them all, and no binding goes before its time.
if bound then
  rcall("PEXPIRE", affinityKey, ttl)
  rcall("PEXPIRE", affinityAtKey, ttl)
end
if sampled > 0 then
  local stale = rcall("ZRANGEBYSCORE", affinityAtKey, "-inf", now - ttl, "LIMIT", 0, 128 * sampled)
  if #stale > 0 then
    rcall("HDEL", affinityKey, unpack(stale))
    rcall("ZREM", affinityAtKey, unpack(stale))
  end
end
return out
