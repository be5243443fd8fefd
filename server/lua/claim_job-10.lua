--[[
  Claims one queued job for a node under a lease token chosen by the caller: queued -> assigned,
  attempt + 1, ack lease starts. Repeating a claim with the same token answers the same assignment,
  so a caller that lost the reply claims again with the token to learn what it holds.

  Input:
    KEYS[1] partition queue zset
    KEYS[2] partition timers zset
    KEYS[3] partition affinity hash (session field -> "<node id>|<ms>")
    KEYS[4] partition affinity times zset (session field -> ms of its binding), to forget old bindings
    KEYS[5] job fsm hash (the record, its spec and its state changes)
    KEYS[6] job payload
    KEYS[7] partition fair-share zset (lua/submit_job-n.lua): the claim moves its band's virtual clock
    KEYS[8] partition queued counts hash (the job is counted out of its second: keys.PartitionKeys.queued)
    KEYS[9] partition held zset (job id -> 0 while assigned, 1 while running: the job enters it)
    KEYS[10] partition paused hash: while it exists, nothing is claimed from the partition (PausePool)
    ARGV[1] job id (a candidate read from the queue earlier)
    ARGV[2] node id
    ARGV[3] lease token of this claim (unique per claim)
    ARGV[4] ack timeout, ms
    ARGV[5] affinity wait, ms: how long a job is held back for its session's preferred node
    ARGV[6] how many queue heads to return as the next candidates
    ARGV[7] avoid window, ms: how long a requeued job keeps away from the nodes it avoids
    ARGV[8] affinity time to live, ms: bindings older than this are deleted (by one call in 8); a claim by
            the node the job prefers leaves a binding younger than an eighth of it as it is (`pat`)

  Output: {code, next candidates, ...}; the candidates are the queue's heads with their scores,
  {id, score, id, score, ...} (the dispatcher pairs jobs in queue order)
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
local fsmKey, payloadKey, fairKey = KEYS[5], KEYS[6], KEYS[7]
local queuedKey, heldKey, pausedKey = KEYS[8], KEYS[9], KEYS[10]
local jobId, nodeId, token = ARGV[1], ARGV[2], ARGV[3]

local function payload(f)  -- "" for a job submitted without one (`np`: no key to read)
  return not f[15] and rcall("GET", payloadKey) or ""
end
local function heads()  -- the next candidates with their queue scores: {id, score, id, score, ...}
  return rcall("ZRANGE", queueKey, 0, tonumber(ARGV[6]) - 1, "WITHSCORES")
end

local f = rcall("HMGET", fsmKey, "state", "ver", "att", "avoid", "pref", "updated", "sess", "node", "tok", "lease",
  "c", "asg", "w", "qs", "np", "pat", unpack(SPEC_FIELDS))
local state = f[1]
if f[9] == token then  -- a repeat of this claim: the same assignment while it holds, else nothing
  if state == FIXED[E.assign] and f[8] == nodeId then
    return {1, heads(), tonumber(f[3]), tonumber(f[10]), spec_of(fsmKey, f, 17), payload(f)}
  end
  return {-7, heads()}
end
if rcall("EXISTS", pausedKey) == 1 then
  return {-14, {}}
end
-- Whether the job is still queued: ZREM's reply where the job leaves the queue anyway, a ZSCORE where it
-- stays (its queue score is the record's `qs`: every ZADD to a queue writes that).
if not state or not allowed(E.assign, state) then
  if rcall("ZREM", queueKey, jobId) == 0 then
    return {-7, heads()}
  end
  if not state then
    return {-1, heads()}
  end
  return {-2, heads(), state}
end
local now = now_ms()
local created = f[11] or rcall("HGET", fsmKey, "created")  -- `created`: a record an earlier version wrote
local updated = tonumber(f[6] or created)  -- a record not changed since its submit has no `updated`
local avoidUntil = updated + tonumber(ARGV[7])
local heldUntil = updated + tonumber(ARGV[5])
local avoided = f[4] and now < avoidUntil and string.find(f[4], "," .. nodeId .. ",", 1, true)
local held = f[5] and f[5] ~= "" and f[5] ~= nodeId and now < heldUntil
if (avoided or held) and not rcall("ZSCORE", queueKey, jobId) then
  return {-7, heads()}
elseif avoided then
  return {-8, heads(), avoidUntil}
elseif held then
  return {-9, heads(), heldUntil}
end
if rcall("ZREM", queueKey, jobId) == 0 then
  return {-7, heads()}
end

local score = tonumber(f[14])
local dest = FIXED[E.assign]
local version = tonumber(f[2]) + 1
local attempt = (tonumber(f[3]) or 0) + 1  -- no `att`: never claimed
local lease = now + tonumber(ARGV[4])
count_queued(queuedKey, updated, -1)  -- when it entered QUEUED (`updated`, else its creation)
rcall("ZADD", heldKey, HELD_SCORE[dest], jobId)
-- Fair share: the band's virtual clock (where a tenant that joins starts) moves to the claimed job's pass;
-- only to the band's head when the job was taken out of turn (a wake-up names the newest job), so such a
-- claim never puts the tenants that join later behind the whole queue. A band left empty evens everyone
-- out: its clock moves to the highest pass handed out. No clock: the key expired, nothing to keep.
local band = math.floor(score / BAND)
local low, clockMember = band * BAND, "c" .. band
local clock = tonumber(rcall("ZSCORE", fairKey, clockMember))
local after = heads()  -- the queue's heads now: returned, and the band's head when the queue's first is in the band
if clock and score > clock then
  local first, head = tonumber(after[2]), nil
  if not first or first >= low + BAND then
    head = {}  -- the queue's lowest score is past the band: the band is empty
  elseif first >= low then
    head = after
  else  -- a band of higher priority comes first
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
local change = record_event(fsmKey, f[13], created, {s = dest, v = version, a = attempt, n = nodeId, e = E.assign,
  t = now})
rcall("HSET", fsmKey, "state", dest, "ver", version, "ev", E.assign, "att", attempt, "node", nodeId,
  "tok", token, "lease", lease, "updated", now, "asg", now, unpack(change))  -- `started`: see lua/touch_job-3.lua
rcall("ZADD", timersKey, lease, lease_member(jobId, token))
-- The session's binding: rewritten unless the job prefers this node and the binding submit read (`pat`:
-- how old it was then, set only with `pref`) is younger than an eighth of the time to live, so a session
-- served by its node rewrites it about once per eighth and it never expires while served. (Should another
-- node have taken the session since the submit, the binding stays with that node: a hint either way.)
local ttl = tonumber(ARGV[8])
if f[5] ~= nodeId or not f[16] or now - (tonumber(created) - tonumber(f[16])) >= ttl / 8 then
  rcall("HSET", affinityKey, f[7], nodeId .. "|" .. now)
  rcall("ZADD", affinityAtKey, now, f[7])
end
-- Bindings past their time to live are ignored (lua/submit_job-n.lua); one claim in 8 (tokens are random
-- hex) deletes up to 128 of them.
if string.byte(token, -1) % 8 == 0 then
  local stale = rcall("ZRANGEBYSCORE", affinityAtKey, "-inf", now - ttl, "LIMIT", 0, 128)
  if #stale > 0 then
    rcall("HDEL", affinityKey, unpack(stale))
    rcall("ZREM", affinityAtKey, unpack(stale))
  end
end
local dispatched = -1  -- "asg" is the time of the job's latest claim: none before, this is its first
if not f[12] and created then
  dispatched = now - tonumber(created)
end
return {1, after, attempt, lease, spec_of(fsmKey, f, 17), payload(f), now - updated, dispatched}
