--[[
  Moves a job to a terminal state (succeeded, failed, cancelled, expired): compare-and-set on the
  state (and version, when given), fenced by node + lease token when given. Drops the payload of a
  job that succeeded or was cancelled (a failed or expired one keeps it for RetryJob, as long as its
  other keys), stores the result (in the record when short: `r`), clears the job's queue and timer
  entries, lets the job's keys expire at max(now, deadline) + retention, and announces the job on its
  session's channel (WatchSession).

  Input:
    KEYS[1] job fsm hash (the record, its spec and its state changes)
    KEYS[2] job payload
    KEYS[3] job result (a result longer than RESULT_INLINE bytes only; a shorter one is the record's `r`)
    KEYS[4] partition queue zset
    KEYS[5] partition timers zset (the job's timers leave it; its forget timer, due when its keys expire,
            enters it: lua/forget_job-4.lua takes the job out of ListJobs' indexes then)
    KEYS[6] partition queued counts hash (a queued job is counted out of its second: keys.PartitionKeys.queued)
    KEYS[7] partition held zset (a held job leaves it)
    KEYS[8] done bucket hash of now ("<pool>|<destination>" counted here, not by the caller as finishes
            per second are, server/rates.py: RetryJob counts the job out of it, exactly)
    KEYS[9] the shard's index of jobs ended in the destination state (ListJobs; used for failed,
             expired and cancelled only; the job's forget timer takes the entry out)
    ARGV[1] job id
    ARGV[2] event (FSM trigger)
    ARGV[3] destination state (decided by the FSM)
    ARGV[4] expected version, "" for any
    ARGV[5] fence: node id, "" for none
    ARGV[6] fence: lease token, "" for none
    ARGV[7] "1" when ARGV[8] is a result to store, "0" otherwise
    ARGV[8] result bytes (may be empty)
    ARGV[9] error code, "" for none
    ARGV[10] error message
    ARGV[11] error retryable, "0" or "1"
    ARGV[12] retention, ms
    ARGV[13] guard: "" none; "lease": only if the lease ran out; "deadline": only if the deadline passed
    ARGV[14] session channel prefix: the announcement goes to this prefix .. the record's `sess`
             (a channel, not a key: no slot; the caller need not know the session)
    ARGV[15] when the done bucket expires, ms

  Output:
    {1, state, version, session, from, run ms}  applied; session is the record's `sess`
                          ("<tenant>\0<session>"), so the caller can count the job out of its tenant's
                          queued jobs (server/quotas.py); from is the state it left; run ms the time
                          since its latest claim when it left a held state (assigned, running), else -1
    {0, state, version}   a repeat of the event already applied (same token); nothing changed
    {-1}                  job not found
    {-2, state}           invalid transition from the current state
    {-3, version}         version mismatch
    {-4, attempt}         stale lease (another claim's token)
    {-5, node}            held by another node
    {-6, state}           already succeeded with a different result
    {-10}                 guard: the lease or deadline has not run out
]]
local fsmKey, payloadKey, resultKey, queueKey, timersKey = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local queuedKey, heldKey, doneKey, endedKey = KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local jobId, event, dest = ARGV[1], ARGV[2], ARGV[3]

local f = rcall("HMGET", fsmKey, "state", "ver", "att", "node", "lease", "dl", "ev", "tok", "sess", "utt", "asg",
  "w", "c", "np", "updated")
local state = f[1]
if not state then
  return {-1}
end
local tok = f[8] or ""  -- a record written before lease tokens has none
if ARGV[6] ~= "" and tok ~= ARGV[6] then
  return {-4, tonumber(f[3]) or 0}
end
local node = f[4] or ""  -- a queued job that never had a node has no `node`
if ARGV[5] ~= "" and node ~= ARGV[5] then
  return {-5, node}
end
-- The result stored: the record's `r` (in pieces), else the result key (a long one, or stored before `r`).
local function stored_result()
  local r = rcall("HMGET", fsmKey, unpack(RESULT_FIELDS))
  if not r[1] then
    return rcall("GET", resultKey)
  end
  local out = {}
  for i = 1, #RESULT_FIELDS do
    if not r[i] then
      break
    end
    out[i] = r[i]
  end
  return table.concat(out)
end
if state == dest and is_repeat(state, f[7], event) then
  if ARGV[7] == "1" and stored_result() ~= ARGV[8] then
    return {-6, state}
  end
  return {0, state, tonumber(f[2])}
end
if not allowed(event, state) then
  return {-2, state}
end
if ARGV[4] ~= "" and f[2] ~= ARGV[4] then
  return {-3, tonumber(f[2])}
end
local now = now_ms()
local lease, deadline = tonumber(f[5]) or 0, tonumber(f[6])  -- no `lease`: never claimed
local guard = ARGV[13]
if (guard == "lease" and (lease == 0 or lease > now)) or (guard == "deadline" and deadline > now) then
  return {-10}
end

local version = tonumber(f[2]) + 1
local created = f[13] or rcall("HGET", fsmKey, "created")  -- `created`: a record an earlier version wrote
local change = record_event(fsmKey, f[12], created, {s = dest, v = version, a = tonumber(f[3]) or 0,
  n = node, e = event, t = now, ec = ARGV[9], em = ARGV[10], er = ARGV[11]})
-- `done`: the done bucket that counts the job (RetryJob counts it out of that one).
if ARGV[9] ~= "" then  -- the last error is that of this change (its `h<version>`): GetJob's last_error
  change[#change + 1], change[#change + 2] = "err", version
end
-- A short result goes in the record (`r`, in pieces), so it expires with it: no key of its own, no expiry
-- to set. Only a job that succeeds has a result (no transition leaves that state).
local result = ARGV[7] == "1" and ARGV[8] or nil
if result and #result <= RESULT_INLINE then
  pieces(change, "r", result)
  result = nil
end
-- A lease says nothing once the job has left its node: 0 (2 bytes, not a time's 10) where the record has one.
if f[5] then
  change[#change + 1], change[#change + 2] = "lease", 0
end
rcall("HSET", fsmKey, "state", dest, "ver", version, "ev", event, "updated", now, "done", doneKey,
  unpack(change))
local retention = tonumber(ARGV[12])
local expireAt = math.max(now, deadline) + retention
rcall("PEXPIREAT", fsmKey, expireAt)
if f[14] then  -- submitted without a payload: no key
elseif dest == S.failed or dest == S.expired then
  rcall("PEXPIREAT", payloadKey, expireAt)  -- RetryJob needs the input
else
  rcall("DEL", payloadKey)
end
if result then  -- too long for the record: a key of its own, expiring with the record
  rcall("SET", resultKey, result, "PXAT", expireAt)
end
rcall("ZREM", timersKey, lease_member(jobId, tok), deadline_member(jobId), retry_member(jobId))
local pool = pool_of(jobId)
if state == S.queued then  -- only a queued job is in its queue (or in backoff, in the timers)
  rcall("ZREM", queueKey, jobId)
  count_queued(queuedKey, f[15] or created, -1)  -- when it entered QUEUED: `updated`, else its creation
else
  rcall("ZREM", heldKey, jobId)
end
count_in(doneKey, pool .. "|" .. dest, tonumber(ARGV[15]))
local ended = NOT_ENDED_INDEXED
if dest ~= S.succeeded then
  rcall("ZADD", endedKey, 0, index_member(jobId))
  ended = dest
end
rcall("ZADD", timersKey, expireAt, forget_member(jobId, f[9], ended))
if f[9] then  -- a record written before sessions were indexed has no `sess`
  rcall("PUBLISH", ARGV[14] .. f[9], session_done_message(jobId, f[10] or "", dest))
end
local ran = -1
if (state == S.assigned or state == S.running) and f[11] then
  ran = now - tonumber(f[11])
end
return {1, dest, version, f[9] or "", state, ran}
