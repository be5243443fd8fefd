--[[
  Creates a job in the state submit leads to, or returns the job an earlier submit with the same
  identity made, provided it asked for the same work (same spec digest). An explicit idempotency key
  is a key of its own; the default identity (utterance and pair) is the session's index plus the digest
  in the job's record (`dg`): the prelude's identity_job finds either.

  Input:
    KEYS[1] idempotency key (identity -> "<job id> <spec digest>"), written for an explicit key only
            (ARGV[18]); for the default identity its name from before `dg`, read for such records only
    KEYS[2] job fsm hash (the record, with the spec: `spec` and its pieces; no state change stored yet:
            the submit is derived from the record; no field that would be empty or zero while queued)
    KEYS[3] job payload
    KEYS[4] partition queue zset
    KEYS[5] partition timers zset
    KEYS[6] partition affinity hash
    KEYS[7] session jobs zset of this partition (job id -> utterance index; WatchSession reads it)
    KEYS[8] partition fair-share zset: "c<band>" -> the band's virtual clock, "t<band>:<tenant>" ->
            the tenant's last pass in the band (both in queue score units), "e" -> minus when the key expires
    KEYS[9] partition queued counts hash (the job is counted in now's second: keys.PartitionKeys.queued)
    KEYS[10] partition jobs index (ListJobs by pool; lex members, see index_member; no time to live:
             the job's forget timer takes its entries out, lua/forget_job-4.lua)
    KEYS[11] tenant jobs index of this shard (ListJobs by tenant)
    KEYS[12] shard pools zset (pool -> until when a job of it may live: GetStats' and ListJobs' list)
    ARGV[1] job id
    ARGV[2] spec bytes (serialized JobSpec without payload)
    ARGV[3] payload bytes ("" for none)
    ARGV[4] priority 0..9
    ARGV[5] max attempts
    ARGV[6] deadline, ms since epoch; 0 for now + ARGV[7]
    ARGV[7] default time to live, ms
    ARGV[8] execution timeout, ms
    ARGV[9] retention of a finished job, ms
    ARGV[10] session field of the affinity hash
    ARGV[11] affinity time to live, ms (an older binding is ignored)
    ARGV[12] wake-up channel
    ARGV[13] spec digest (what a repeat must match)
    ARGV[14] utterance index
    ARGV[15] tenant id
    ARGV[16] fair step: how far apart the tenant's jobs go in a band (FAIR_STEP / its weight, >= 1)
    ARGV[17] what the caller knows of the pool's score in KEYS[12] (ms; it saw this script write it
             lately): the entry is written only when this job may live longer; "" writes it
    ARGV[18] "1" when the identity is the spec's idempotency key, "" for the default identity
    ARGV[19] what the caller knows of when KEYS[7] expires (ms; it saw this script write or read it lately):
             no PTTL when this job's keys expire before that; "" (or absent) reads it

  Output:
    {1, job id, state, pools, session}  created; pools is the score written to KEYS[12] (a lower bound of
                        the pool's score from now on: the caller's next ARGV[17]), 0 when not written;
                        session when KEYS[7] expires as written or read now (the caller's next ARGV[19]),
                        0 when neither (ARGV[19] said enough)
    {0, job id}         the identity already had this job, with the same digest; nothing changed
    {-11, job id}       the identity already had this job, with another digest; nothing changed
]]
local idemKey, fsmKey, payloadKey = KEYS[1], KEYS[2], KEYS[3]
local queueKey, timersKey, affinityKey = KEYS[4], KEYS[5], KEYS[6]
local sessionKey, fairKey = KEYS[7], KEYS[8]
local queuedKey, jobsKey, tenantJobsKey, poolsKey = KEYS[9], KEYS[10], KEYS[11], KEYS[12]
local jobId, digest, utterance, keyed = ARGV[1], ARGV[13], ARGV[14], ARGV[18] == "1"

local id, stored = identity_job(idemKey, sessionKey, jobId, utterance, keyed)
if id then
  -- An earlier version stored 32 hex digits: the digest is their first 16 (server/store.py's spec_digest).
  if stored ~= "" and string.sub(stored, 1, #digest) ~= digest then
    return {-11, id}
  end
  return {0, id}
end

local now = now_ms()
local deadline = tonumber(ARGV[6])
if deadline == 0 then
  deadline = now + tonumber(ARGV[7])
end
local retention = tonumber(ARGV[9])

-- Fair share (stride scheduling): within a priority band, each of a tenant's jobs goes one step (FAIR_STEP
-- / weight) after the tenant's previous one, and never before the band's virtual clock (where dispatch
-- is: lua/claim_job-10.lua moves it), so a tenant that joins is served next and busy tenants take turns.
-- Entries below the clock say nothing more than "starts at the clock": a sampled submit deletes them.
-- The key's member "e" holds minus when the key expires (a negative score, below every band),
-- read in the same ZMSCORE as the clock and the tenant's pass: no PTTL per submit.
-- `sampled`: the cleanups that need not run at every submit run at about one in 6 (ids are random, and 5
-- of the 32 characters a ULID ends with pass this test).
local sampled = string.byte(jobId, -1) % 8 == 0
local band = 9 - tonumber(ARGV[4])
local low = band * BAND
local clockMember, tenantMember = "c" .. band, "t" .. band .. ":" .. ARGV[15]
local fair = rcall("ZMSCORE", fairKey, clockMember, tenantMember, "e")
local clock, last = tonumber(fair[1]), tonumber(fair[2])
if clock and clock - low >= FAIR_RESET
    and not rcall("ZRANGEBYSCORE", queueKey, low, "(" .. fmt(low + BAND), "LIMIT", 0, 1)[1] then
  rcall("ZREMRANGEBYSCORE", fairKey, low, "(" .. fmt(low + BAND))  -- far on and empty: start the band again
  clock, last = nil, nil
end
local written = {}  -- what goes in the one ZADD below besides the tenant's pass
if not clock then
  clock = low
  written = {clock, clockMember}
elseif sampled then
  rcall("ZREMRANGEBYSCORE", fairKey, low, "(" .. fmt(clock))
end
last = last or clock
local queueScore = math.min(math.max(last, clock) + tonumber(ARGV[16]), low + BAND - 1)
-- The fair share matters while a job of the partition may still be queued: until the last deadline, an
-- eighth later (as the session's index below; "e" says until when).
local fairUntil = nil
if not fair[3] or -tonumber(fair[3]) < deadline then
  fairUntil = deadline + math.floor((deadline - now) / 8)
  written[#written + 1], written[#written + 2] = -fairUntil, "e"
end
rcall("ZADD", fairKey, queueScore, tenantMember, unpack(written))
if fairUntil then
  rcall("PEXPIREAT", fairKey, fairUntil)
end

local preferred, bound = "", 0
local binding = rcall("HGET", affinityKey, ARGV[10])
if binding then
  local node, at = string.match(binding, "^(.*)|(%d+)$")
  if node and tonumber(at) + tonumber(ARGV[11]) > now then
    preferred = node
    bound = now - tonumber(at)
  end
end

local state = FIXED[E.submit]
-- Only what says something: until claimed a record has no `att` (0), `ev` (the submit), `updated` (= its
-- creation, `c`), `node`, `tok`, `lease`, `started`, `avoid`, nor `pref` without a preferred node; readers take
-- absent as those values (docs/design.md, "Keys"). Each byte is in every queued job's listpack.
local extra = ARGV[3] == "" and {"np", 1} or {}  -- np: no payload key to read or drop
if preferred ~= "" then  -- and `pat`: how old the binding was, so its node's claim need not rewrite a young one
  extra[#extra + 1], extra[#extra + 2], extra[#extra + 3], extra[#extra + 4] = "pref", preferred, "pat", bound
end
rcall("HSET", fsmKey, "state", state, "ver", 1, "m", ARGV[5], "dl", deadline, "xto", ARGV[8],
  "c", now, "qs", queueScore, "sess", ARGV[10], "utt", utterance,
  "dg", keyed and "" or digest,  -- what a repeat of the default identity must match (prelude: identity_job)
  unpack(pieces(extra, "spec", ARGV[2])))
if ARGV[3] ~= "" then
  rcall("SET", payloadKey, ARGV[3])
end
-- An explicit identity outlives no job record: records of finished jobs expire at max(finish, deadline) +
-- retention. The default identity lives in the record (`dg`): exactly as long.
if keyed then
  rcall("SET", idemKey, jobId .. " " .. digest, "PXAT", deadline + retention)
end
rcall("ZADD", queueKey, queueScore, jobId)
-- The session's index lives as long as its longest-lived job record (deadline + retention), and up to an
-- eighth longer: a key extended at each submit would cost a PEXPIREAT each, one extended by an eighth more
-- than it needs costs one per eighth of that time. No PTTL when the caller saw the key's expiry lately
-- and it is far enough (ARGV[19]; a failover that lost it is repaired by the session's next submit after
-- server/rates.py's SESSIONS_KNOWN_S).
rcall("ZADD", sessionKey, utterance, jobId)
local keepUntil = deadline + retention
local sessionUntil = 0
if (ARGV[19] or "") == "" or keepUntil > tonumber(ARGV[19]) then
  local ttl = rcall("PTTL", sessionKey)
  sessionUntil = now + ttl
  if ttl < 0 or sessionUntil < keepUntil then
    sessionUntil = keepUntil + math.floor((keepUntil - now) / 8)
    rcall("PEXPIREAT", sessionKey, sessionUntil)
  end
end
rcall("ZADD", timersKey, deadline, deadline_member(jobId))
-- What ListJobs and GetStats read: an index entry lives as long as the job's record (its forget timer,
-- set when it ends, takes it out: lua/finish_job-9.lua).
count_queued(queuedKey, now, 1)  -- its creation (`c`) is now: claim and finish count it out of this second
-- The pool stays listed while a job of it may live: written when this job may outlive what the caller
-- knows of the entry (it saw it lately, so no failover can have lost it long since), an eighth further
-- than needed (as above), so a busy pool's submits write it about once per second per instance and shard.
-- (Submits per pool and second are counted by the caller: server/rates.py.)
local pooled = 0
if ARGV[17] == "" or keepUntil > tonumber(ARGV[17]) then
  pooled = keepUntil + math.floor((keepUntil - now) / 8)
  rcall("ZADD", poolsKey, "GT", pooled, pool_of(jobId))
end
local member = index_member(jobId)
rcall("ZADD", jobsKey, 0, member)
rcall("ZADD", tenantJobsKey, 0, member)
if sampled then  -- pools whose jobs are all gone leave
  rcall("ZREMRANGEBYSCORE", poolsKey, "-inf", "(" .. now)
end
rcall("PUBLISH", ARGV[12], wake_message(jobId, preferred, queueScore))
return {1, jobId, state, pooled, sessionUntil}
