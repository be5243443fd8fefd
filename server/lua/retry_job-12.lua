--[[
  Puts a failed or expired job back in its queue (RetryJob): compare-and-set on the state and version,
  a fresh attempt budget (attempts counted from 0 again) and a new deadline. The job's keys stop
  expiring (they expire again when it ends), it re-enters its queue at its queue score (priority and
  fair-share pass as submitted), gets a deadline timer, leaves the index of its ended state, is
  counted out of the ended jobs of its finish's bucket, and the retry is recorded in its events with
  the reason (WatchJob shows it) and announced to the dispatchers.

  Input:
    KEYS[1] job fsm hash (the record, its spec and its state changes)
    KEYS[2] job payload
    KEYS[3] partition queue zset
    KEYS[4] partition timers zset (the job's forget timer leaves it, a deadline timer enters it)
    KEYS[5] partition queued counts hash (the job is counted in now's second: keys.PartitionKeys.queued)
    KEYS[6] the shard's index of jobs ended in the job's current state (lua/finish_job-n.lua)
    KEYS[7] done bucket hash of the job's finish (the record's `done`; "<pool>|<state>" counted down)
    KEYS[8] idempotency key of the job (lives as long as the job record again). A job of the default
            identity has none (its identity is its record's `dg`, persisted with the record below): the
            name its identity had before `dg`, extended if a job from then still has it
    KEYS[9] session jobs zset (WatchSession's index; lives as long as its longest-lived job)
    KEYS[10] partition jobs index (ListJobs by pool; the entry is added again, in case a sweeper whose
             clock runs ahead fired the forget timer before the record expired)
    KEYS[11] tenant jobs index of this shard (ListJobs by tenant; likewise)
    KEYS[12] shard pools zset (the pool lives on at least as long as the job: lua/submit_job-n.lua)
    ARGV[1] job id
    ARGV[2] expected version
    ARGV[3] new deadline, ms since epoch; 0 for now + the job's own time to live (its first deadline -
            created), at most ARGV[4] ahead
    ARGV[4] max job time to live, ms
    ARGV[5] new max attempts; 0 keeps the job's own
    ARGV[6] reason (recorded as the retry event's message)
    ARGV[7] retention of a finished job, ms
    ARGV[8] wake-up channel

  Output:
    {1, state, version, deadline ms}   queued again
    {-1}                  job not found
    {-2, state}           not failed or expired
    {-3, version}         version mismatch
]]
local fsmKey, payloadKey, queueKey, timersKey, queuedKey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local endedKey, doneKey, idemKey, sessionKey = KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local jobsKey, tenantJobsKey, poolsKey = KEYS[10], KEYS[11], KEYS[12]
local jobId = ARGV[1]

local f = rcall("HMGET", fsmKey, "state", "ver", "dl", "c", "ttl", "m", "qs", "w", "sess")
local state = f[1]
if not state then
  return {-1}
end
if not allowed(E.retry, state) then
  return {-2, state}
end
if f[2] ~= ARGV[2] then
  return {-3, tonumber(f[2])}
end
local now = now_ms()
if not f[4] or not f[6] then  -- a record an earlier version wrote: `created`, `maxatt` (a retry since wrote `m`)
  local old = rcall("HMGET", fsmKey, "created", "maxatt")
  f[4], f[6] = f[4] or old[1], f[6] or old[2]
end
local ttl = tonumber(f[5]) or (tonumber(f[3]) - tonumber(f[4]))
local deadline = tonumber(ARGV[3])
if deadline == 0 then
  deadline = now + math.min(ttl, tonumber(ARGV[4]))
end
local maxAttempts = tonumber(ARGV[5])
if maxAttempts == 0 then
  maxAttempts = tonumber(f[6])
end
local dest = FIXED[E.retry]
local version = tonumber(f[2]) + 1
-- The reason rides as the event's error (code LINGUA_RETRIED), as a cancel's does; last_error stays.
local change = record_event(fsmKey, f[8], f[4], {s = dest, v = version, a = 0, n = "", e = E.retry,
  t = now, ec = "LINGUA_RETRIED", em = ARGV[6], er = "0"})
rcall("HSET", fsmKey, "state", dest, "ver", version, "ev", E.retry, "m", maxAttempts, "dl", deadline, "ttl", ttl,
  "updated", now, unpack(change))
-- Queued afresh: the fields of the attempts before go, as a record never claimed has none (absent is 0,
-- "" or no node: docs/design.md, "Keys"), so GetJob shows no node or lease of an attempt that is over.
rcall("HDEL", fsmKey, "att", "node", "tok", "lease", "started", "avoid", "pref", "pat")
rcall("PERSIST", fsmKey)
rcall("PERSIST", payloadKey)
local retention = tonumber(ARGV[7])
rcall("PEXPIREAT", idemKey, deadline + retention)
local ttlLeft = rcall("PTTL", sessionKey)
if ttlLeft >= 0 and now + ttlLeft < deadline + retention then
  rcall("PEXPIREAT", sessionKey, deadline + retention)
end
-- The job's index entries stay: it is no longer forgotten when its record would have expired (its forget
-- timer, lua/finish_job-n.lua, goes; the job gets another when it ends again). An entry the forget
-- took already (a sweeper's clock ahead of Redis's) comes back: ZADD of a member present changes nothing.
local member = index_member(jobId)
rcall("ZREM", timersKey, forget_member(jobId, f[9], state))
rcall("ZADD", jobsKey, 0, member)
rcall("ZADD", tenantJobsKey, 0, member)
rcall("ZREM", endedKey, member)
local pool = pool_of(jobId)
rcall("ZADD", poolsKey, "GT", deadline + retention, pool)
if tonumber(rcall("HINCRBY", doneKey, pool .. "|" .. state, -1)) < 0 then
  rcall("HDEL", doneKey, pool .. "|" .. state)  -- the bucket expired meanwhile: nothing to count out
end
rcall("ZADD", timersKey, deadline, deadline_member(jobId))
count_queued(queuedKey, now, 1)
rcall("ZADD", queueKey, f[7], jobId)
rcall("PUBLISH", ARGV[8], wake_message(jobId, "", f[7]))
return {1, dest, version, deadline}
