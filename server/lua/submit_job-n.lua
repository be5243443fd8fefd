--[[
  Creates jobs of one partition (one pool in one shard) in the state submit leads to, or for each job
  returns the job an earlier submit with the same identity made, provided it asked for the same work (same
  spec digest). An explicit idempotency key is a key of its own; the default identity (utterance and target
  language) is the session's index plus the digest in the job's record (`dg`): the prelude's identity_in
  finds either, and other_pair / other_key the identity's job in another source language (a conflict). A
  repeat inside the call is the call's own earlier job.

  One call for a Submit's jobs of a partition (server/store.py groups them): what is per job is its record
  (and payload, explicit identity); the rest is one command per key for the whole call (the queue, the
  timers, the indexes and counts take every job in one ZADD or HINCRBY; the fair share and the affinity
  bindings are read once), so a batch costs a few commands per job, not fifteen.

  Input (the key count varies: 7 + 5 per job, file name `-n`):
    KEYS[1] partition queue zset
    KEYS[2] partition timers zset
    KEYS[3] partition affinity hash
    KEYS[4] partition fair-share zset: "c<band>" -> the band's virtual clock, "t<band>:<tenant>" -> the
            tenant's last pass in the band (both in queue score units), "e" -> minus when the key expires
    KEYS[5] partition queued counts hash (jobs are counted in now's second: keys.PartitionKeys.queued)
    KEYS[6] partition jobs index (ListJobs by pool; lex members, see index_member; no time to live:
            the job's forget timer takes its entries out, lua/forget_job-n.lua)
    KEYS[7] shard pools zset (pool -> until when a job of it may live: GetStats' and ListJobs' list)
    then per job i (k = 7 + 5 * (i - 1)):
    KEYS[k+1] idempotency key (identity -> "<job id> <spec digest>"), written for an explicit key only;
              for the default identity its name from before `dg`, read for such records only
    KEYS[k+2] job fsm hash (the record, with the spec: `spec` and its pieces; no state change stored yet:
              the submit is derived from the record; no field that would be empty or zero while queued)
    KEYS[k+3] job payload
    KEYS[k+4] session jobs zset of this shard (job id -> utterance index; WatchSession reads it)
    KEYS[k+5] tenant jobs index of this shard (ListJobs by tenant)
    ARGV[1] default time to live, ms
    ARGV[2] retention of a finished job, ms
    ARGV[3] affinity time to live, ms (an older binding is ignored)
    ARGV[4] wake-up channel
    ARGV[5] what the caller knows of the pool's score in KEYS[7] (ms; it saw this script write it lately):
            the entry is written only when a job may live longer; "" writes it
    then per job i (a = 5 + 14 * (i - 1)):
    ARGV[a+1] job id
    ARGV[a+2] spec bytes (serialized JobSpec without payload)
    ARGV[a+3] payload bytes ("" for none)
    ARGV[a+4] priority 0..9
    ARGV[a+5] max attempts
    ARGV[a+6] deadline, ms since epoch; 0 for now + ARGV[1]
    ARGV[a+7] execution timeout, ms
    ARGV[a+8] session field of the affinity hash
    ARGV[a+9] spec digest (what a repeat must match)
    ARGV[a+10] utterance index
    ARGV[a+11] tenant id
    ARGV[a+12] fair step: how far apart the tenant's jobs go in a band (FAIR_STEP / its weight, >= 1)
    ARGV[a+13] "1" when the identity is the spec's idempotency key, "" for the default identity
    ARGV[a+14] what the caller knows of when KEYS[k+4] expires (ms; it saw this script write or read it
               lately): no PTTL when the session's jobs expire before that; "" reads it

  Output: one reply per job, in order:
    {1, job id, state, pools, session}  created; pools is the score written to KEYS[7] (a lower bound of
                        the pool's score from now on: the caller's next ARGV[5]), 0 when not written;
                        session when KEYS[k+4] expires as written or read now (the caller's next ARGV[a+14]),
                        0 when neither (the caller's knowledge said enough)
    {0, job id}         the identity already had this job, with the same digest; nothing changed
    {-11, job id}       the identity already had this job, with another digest; nothing changed
]]
local queueKey, timersKey, affinityKey, fairKey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local queuedKey, jobsKey, poolsKey = KEYS[5], KEYS[6], KEYS[7]
local n = (#KEYS - 7) / 5
local now = now_ms()
local nowS = string.format("%d", now)  -- numbers go to Redis as integer strings (claim_job-n.lua says why)
local retention = tonumber(ARGV[2])

-- First pass: what the whole call reads once. The default identities' session entries (one ZRANGEBYSCORE
-- per session, over the utterances of the call, unless they are far apart), the fair-share members (one
-- ZMSCORE), the bindings (one HMGET).
local span, fairNames, sessions = {}, {"e"}, {}
local function ask(list, seen, name)
  if not seen[name] then
    seen[name] = true
    list[#list + 1] = name
  end
end
local seenFair, seenSession = {e = true}, {}
for i = 1, n do
  local k, a = 7 + 5 * (i - 1), 5 + 14 * (i - 1)
  local band = 9 - tonumber(ARGV[a + 4])
  ask(fairNames, seenFair, "c" .. band)
  ask(fairNames, seenFair, "t" .. band .. ":" .. ARGV[a + 11])
  ask(sessions, seenSession, ARGV[a + 8])
  if ARGV[a + 13] ~= "1" then
    local s = span[KEYS[k + 4]] or {}
    s[#s + 1] = tonumber(ARGV[a + 10])
    span[KEYS[k + 4]] = s
  end
end
local atUtterance = {}  -- session key -> utterance -> the session's job ids at it
for key, us in pairs(span) do
  local low, high = math.min(unpack(us)), math.max(unpack(us))
  local ranges = {{low, high}}
  if high - low >= 4 * #us then  -- far apart (a resubmit of old utterances): each on its own, not all between
    ranges = {}
    for _, u in ipairs(us) do
      ranges[#ranges + 1] = {u, u}
    end
  end
  local by = {}
  for _, r in ipairs(ranges) do
    local found = rcall("ZRANGEBYSCORE", key, r[1], r[2], "WITHSCORES")
    for j = 1, #found, 2 do
      local u = tonumber(found[j + 1])
      by[u] = by[u] or {}
      table.insert(by[u], found[j])
    end
  end
  atUtterance[key] = by
end
local fair = {}  -- member -> score, false for none
for j, v in ipairs(rcall("ZMSCORE", fairKey, unpack(fairNames))) do
  fair[fairNames[j]] = tonumber(v) or false
end
local binding = {}
for j, v in ipairs(rcall("HMGET", affinityKey, unpack(sessions))) do
  binding[sessions[j]] = v
end

-- `sampled`: the cleanups that need not run at every submit run when a job of the call is one in 6 (ids are
-- random, and 5 of the 32 characters a ULID ends with pass this test), once per call (a band's, once per band).
local sampled, cleaned = false, {}
local made = {}  -- identity key -> {job id, digest} of a job this call created
local pools = nil  -- the shard's pools (KEYS[7]'s members), read at the call's first new key
local out = {}
local queued, timers, index, wakes = {}, {}, {}, {}
local sessionAdds, tenantAdds = {}, {}  -- key -> {score, member, ...}
local sessionKeep, sessionKnown = {}, {}  -- session key -> furthest keep, what the caller knows
local fairWrites, fairUntil, reset = {}, nil, {}
local keepMax = 0
-- One job: its reply. Run under pcall: a job that fails (a value Redis refuses) is an error in its place, and
-- only what it wrote itself is left (what it adds to the shared writes is added once its own writes are done).
local function submit(i)
  local k, a = 7 + 5 * (i - 1), 5 + 14 * (i - 1)
  local idemKey, fsmKey, payloadKey, sessionKey, tenantJobsKey = KEYS[k + 1], KEYS[k + 2], KEYS[k + 3],
    KEYS[k + 4], KEYS[k + 5]
  local jobId, digest, utterance, keyed = ARGV[a + 1], ARGV[a + 9], ARGV[a + 10], ARGV[a + 13] == "1"
  local id, stored
  if made[idemKey] then
    id, stored = made[idemKey][1], made[idemKey][2]
  elseif keyed then
    id, stored = keyed_job(idemKey)
    if not id then  -- a new key (or one in another source language): the shard's pools, read once a call
      pools = pools or rcall("ZRANGEBYSCORE", poolsKey, now, "+inf")  -- those whose jobs may still live
      id, stored = other_key(idemKey, pools, jobId)
    end
  else
    id, stored = identity_in(idemKey, atUtterance[sessionKey][tonumber(utterance)] or {}, jobId)
  end
  if id then
    -- An earlier version stored 32 hex digits: the digest is their first 16 (server/store.py's spec_digest).
    if stored ~= "" and string.sub(stored, 1, #digest) ~= digest then
      return {-11, id}
    end
    return {0, id}
  end
  local deadline = tonumber(ARGV[a + 6])
  if deadline == 0 then
    deadline = now + tonumber(ARGV[1])
  end
  -- Fair share (stride scheduling): within a priority band, each of a tenant's jobs goes one step (FAIR_STEP
  -- / weight) after the tenant's previous one, and never before the band's virtual clock (where dispatch
  -- is: lua/claim_job-n.lua moves it), so a tenant that joins is served next and busy tenants take turns.
  -- Entries below the clock say nothing more than "starts at the clock": a sampled submit deletes them.
  -- The key's member "e" holds minus when the key expires (a negative score, below every band),
  -- read in the same ZMSCORE as the clocks and the tenants' passes: no PTTL per submit.
  local band = 9 - tonumber(ARGV[a + 4])
  local low = band * BAND
  local clockMember, tenantMember = "c" .. band, "t" .. band .. ":" .. ARGV[a + 11]
  local clock, last = fair[clockMember], fair[tenantMember]
  if clock and clock - low >= FAIR_RESET and not reset[band]
      and not rcall("ZRANGEBYSCORE", queueKey, low, "(" .. fmt(low + BAND), "LIMIT", 0, 1)[1] then
    rcall("ZREMRANGEBYSCORE", fairKey, low, "(" .. fmt(low + BAND))  -- far on and empty: start the band again
    local passes = "t" .. band .. ":"
    for name in pairs(fair) do  -- what was read of the band is gone (its first job in the call: none written)
      if name == clockMember or string.sub(name, 1, #passes) == passes then
        fair[name] = false
      end
    end
    clock, last = false, false
  end
  reset[band] = true  -- only a band's first job in the call checks: the call's jobs enter the queue below
  if not clock then
    clock = low
    fair[clockMember] = clock
    fairWrites[clockMember] = clock
  elseif not cleaned[band] and string.byte(jobId, -1) % 8 == 0 then
    cleaned[band] = true
    rcall("ZREMRANGEBYSCORE", fairKey, low, "(" .. fmt(clock))
  end
  last = last or clock
  local queueScore = math.min(math.max(last, clock) + tonumber(ARGV[a + 12]), low + BAND - 1)
  fair[tenantMember] = queueScore
  fairWrites[tenantMember] = queueScore
  -- The fair share matters while a job of the partition may still be queued: until the last deadline, an
  -- eighth later (as the session's index below; "e" says until when).
  local e = fair.e
  if not e or -e < deadline then
    local untilMs = deadline + math.floor((deadline - now) / 8)
    fair.e, fairUntil = -untilMs, untilMs
    fairWrites.e = -untilMs
  end

  local preferred, bound = "", 0
  local b = binding[ARGV[a + 8]]
  if b then
    local node, at = string.match(b, "^(.*)|(%d+)$")
    if node and tonumber(at) + tonumber(ARGV[3]) > now then
      preferred = node
      bound = now - tonumber(at)
    end
  end

  local state = FIXED[E.submit]
  -- Only what says something: until claimed a record has no `att` (0), `ev` (the submit), `updated` (= its
  -- creation, `c`), `node`, `tok`, `lease`, `started`, `avoid`, nor `pref` without a preferred node; readers
  -- take absent as those values (docs/design.md, "Keys"). Each byte is in every queued job's listpack.
  local extra = ARGV[a + 3] == "" and {"np", 1} or {}  -- np: no payload key to read or drop
  if preferred ~= "" then  -- and `pat`: how old the binding was, so its node's claim need not rewrite a young one
    extra[#extra + 1], extra[#extra + 2], extra[#extra + 3], extra[#extra + 4] = "pref", preferred, "pat", bound
  end
  local deadlineS = string.format("%d", deadline)
  rcall("HSET", fsmKey, "state", state, "ver", "1", "m", ARGV[a + 5], "dl", deadlineS, "xto", ARGV[a + 7],
    "c", nowS, "qs", queueScore, "sess", ARGV[a + 8], "utt", utterance,
    "dg", keyed and "" or digest,  -- what a repeat of the default identity must match (prelude: identity_in)
    unpack(pieces(extra, "spec", ARGV[a + 2])))
  if ARGV[a + 3] ~= "" then
    rcall("SET", payloadKey, ARGV[a + 3])
  end
  local keepUntil = deadline + retention
  -- An explicit identity outlives no job record: records of finished jobs expire at max(finish, deadline) +
  -- retention. The default identity lives in the record (`dg`): exactly as long.
  if keyed then
    rcall("SET", idemKey, jobId .. " " .. digest, "PXAT", keepUntil)
  end
  queued[#queued + 1], queued[#queued + 2] = queueScore, jobId
  timers[#timers + 1], timers[#timers + 2] = deadlineS, deadline_member(jobId)
  local member = index_member(jobId)
  index[#index + 1], index[#index + 2] = "0", member
  local adds = sessionAdds[sessionKey] or {}
  adds[#adds + 1], adds[#adds + 2] = utterance, jobId
  sessionAdds[sessionKey] = adds
  adds = tenantAdds[tenantJobsKey] or {}
  adds[#adds + 1], adds[#adds + 2] = "0", member
  tenantAdds[tenantJobsKey] = adds
  sessionKeep[sessionKey] = math.max(sessionKeep[sessionKey] or 0, keepUntil)
  sessionKnown[sessionKey] = ARGV[a + 14]
  keepMax = math.max(keepMax, keepUntil)
  wakes[#wakes + 1] = wake_message(jobId, preferred, queueScore)
  made[idemKey] = {jobId, digest}
  sampled = sampled or string.byte(jobId, -1) % 8 == 0
  return {1, jobId, state, 0, 0}  -- pools and session filled in below
end
for i = 1, n do
  local ok, reply = pcall(submit, i)
  out[i] = ok and reply or {err = type(reply) == "table" and reply.err or tostring(reply)}
end
if #queued == 0 then
  return out
end

local written = {}
for name, score in pairs(fairWrites) do
  written[#written + 1], written[#written + 2] = score, name
end
rcall("ZADD", fairKey, unpack(written))
if fairUntil then
  rcall("PEXPIREAT", fairKey, fairUntil)
end
rcall("ZADD", queueKey, unpack(queued))
-- The session's index lives as long as its longest-lived job record (deadline + retention), and up to an
-- eighth longer: a key extended at each submit would cost a PEXPIREAT each, one extended by an eighth more
-- than it needs costs one per eighth of that time (a call writes its furthest job's: maybe later than one call
-- per job would, never earlier). No PTTL when the caller saw the key's expiry lately
-- and it is far enough (a failover that lost it is repaired by the session's next submit after
-- server/rates.py's SESSIONS_KNOWN_S).
local sessionUntil = {}
for key, adds in pairs(sessionAdds) do
  rcall("ZADD", key, unpack(adds))
  local keep, known = sessionKeep[key], sessionKnown[key]
  sessionUntil[key] = 0
  if (known or "") == "" or keep > tonumber(known) then
    local ttl = rcall("PTTL", key)
    sessionUntil[key] = now + ttl
    if ttl < 0 or sessionUntil[key] < keep then
      sessionUntil[key] = keep + math.floor((keep - now) / 8)
      rcall("PEXPIREAT", key, sessionUntil[key])
    end
  end
end
rcall("ZADD", timersKey, unpack(timers))
-- What ListJobs and GetStats read: an index entry lives as long as the job's record (its forget timer,
-- set when it ends, takes it out: lua/finish_job-n.lua).
count_queued(queuedKey, now, #queued / 2)  -- their creation (`c`) is now: claim and finish count each out
-- The pool stays listed while a job of it may live: written when a job may outlive what the caller knows of
-- the entry (it saw it lately, so no failover can have lost it long since), an eighth further than needed
-- (as above), so a busy pool's submits write it about once per second per instance and shard.
-- (Submits per pool and second are counted by the caller: server/rates.py.)
local pooled = 0
if ARGV[5] == "" or keepMax > tonumber(ARGV[5]) then
  pooled = keepMax + math.floor((keepMax - now) / 8)
  rcall("ZADD", poolsKey, "GT", pooled, pool_of(ARGV[6]))
end
rcall("ZADD", jobsKey, unpack(index))
for key, adds in pairs(tenantAdds) do
  rcall("ZADD", key, unpack(adds))
end
if sampled then  -- pools whose jobs are all gone leave
  rcall("ZREMRANGEBYSCORE", poolsKey, "-inf", "(" .. now)
end
rcall("PUBLISH", ARGV[4], table.concat(wakes, WAKES_SEP))
for i = 1, n do
  if out[i][1] == 1 then  -- (an error reply has no [1])
    out[i][4] = pooled
    out[i][5] = sessionUntil[KEYS[7 + 5 * (i - 1) + 4]]
  end
end
return out
