--[[
  Moves jobs of one shard to a terminal state (succeeded, failed, cancelled, expired), each on its own:
  compare-and-set on the state (and version, when given), fenced by node + lease token when given. Drops
  the payload of a job that succeeded or was cancelled (a failed or expired one keeps it for RetryJob, as
  long as its other keys), stores the result (in the record when short: `r`), clears the job's queue and
  timer entries, lets the job's keys expire at max(now, deadline) + retention, and announces the job on its
  session's channel (WatchSession).

  One call takes a batch (a node's completions of one shard: server/store.py's finish_many) or one job.
  What is per job (the record's HMGET, HSET, PEXPIREAT; the payload, a long result) is done job by job, in
  order, so a later job of the call sees what an earlier one changed; what the jobs' changes share a key
  for is sent once per key after the last job: one ZREM of the timers (every applied job's timer members)
  and one ZADD of their forget timers, one ZREM per queue or held zset, one HINCRBY per done bucket field,
  one ZADD per ended index. The session announcement stays one PUBLISH per job: an earlier version's
  WatchSession reads one job per message (server/wire.py's parse_session_done reads several lines, for a
  later release to send them in one).

  Input (the key count varies: 2 + 7 per job, file name `-n`; 3 + 12 arguments per job):
    KEYS[1] shard timers zset (the jobs' timers leave it; their forget timers, due when their keys expire,
            enter it: lua/forget_job-n.lua takes a job out of ListJobs' indexes then)
    KEYS[2] done bucket hash of now ("<pool>|<destination>" counted here, not by the caller as finishes
            per second are, server/rates.py: RetryJob counts the job out of it, exactly)
    KEYS[3 + 7(i-1)] ... KEYS[9 + 7(i-1)], job i's:
      +0 job fsm hash (the record, its spec and its state changes)
      +1 job payload
      +2 job result (a result longer than RESULT_INLINE bytes only; a shorter one is the record's `r`)
      +3 partition queue zset
      +4 partition queued counts hash (a queued job is counted out of its second: keys.PartitionKeys.queued)
      +5 partition held zset (a held job leaves it)
      +6 the shard's index of jobs ended in the destination state (ListJobs; used for failed, expired and
         cancelled only; the job's forget timer takes the entry out)
    ARGV[1] retention, ms
    ARGV[2] when the done bucket expires, ms
    ARGV[3] session channel prefix: a job's announcement goes to this prefix .. the record's `sess`
            (a channel, not a key: no slot; the caller need not know the session)
    ARGV[4 + 12(i-1)] ... ARGV[15 + 12(i-1)], job i's:
      +0 job id
      +1 event (FSM trigger)
      +2 destination state (decided by the FSM)
      +3 expected version, "" for any
      +4 fence: node id, "" for none
      +5 fence: lease token, "" for none
      +6 "1" when +7 is a result to store, "0" otherwise
      +7 result bytes (may be empty)
      +8 error code, "" for none
      +9 error message
      +10 error retryable, "0" or "1"
      +11 guard: "" none; "lease": only if the lease ran out; "deadline": only if the deadline passed

  Output: one reply per job, in order:
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
    an error              this job's commands failed (a record no version wrote): the other jobs go on
]]
local timersKey, doneKey = KEYS[1], KEYS[2]
local retention, doneExpiry, channelPrefix = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local now, nowS  -- Redis time, read once: by the first job that gets that far (and as a string)

-- What the jobs change in keys they share, sent once per key after the last job (the prelude's add()).
local timersGone, forgets, leaving, ended, counted = {}, {}, {}, {}, {}

local function finish(k, a)
  local fsmKey, payloadKey, resultKey, queueKey = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  local queuedKey, heldKey, endedKey = KEYS[k + 4], KEYS[k + 5], KEYS[k + 6]
  local jobId, event, dest, expected, fenceNode, fenceToken = unpack(ARGV, a, a + 5)
  local hasResult, result, ecode, emsg, eretry, guard = unpack(ARGV, a + 6, a + 11)

  local f = rcall("HMGET", fsmKey, "state", "ver", "att", "node", "lease", "dl", "ev", "tok", "sess", "utt",
    "asg", "w", "c", "np", "updated")
  local state = f[1]
  if not state then
    return {-1}
  end
  local tok = f[8] or ""  -- a record written before lease tokens has none
  if fenceToken ~= "" and tok ~= fenceToken then
    return {-4, tonumber(f[3]) or 0}
  end
  local node = f[4] or ""  -- a queued job that never had a node has no `node`
  if fenceNode ~= "" and node ~= fenceNode then
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
    if hasResult == "1" and stored_result() ~= result then
      return {-6, state}
    end
    return {0, state, tonumber(f[2])}
  end
  if not allowed(event, state) then
    return {-2, state}
  end
  if expected ~= "" and f[2] ~= expected then
    return {-3, tonumber(f[2])}
  end
  if not now then
    now = now_ms()
    nowS = string.format("%d", now)  -- numbers go to Redis as integer strings (claim_job-n.lua says why)
  end
  local lease, deadline = tonumber(f[5]) or 0, tonumber(f[6])  -- no `lease`: never claimed
  if (guard == "lease" and (lease == 0 or lease > now)) or (guard == "deadline" and deadline > now) then
    return {-10}
  end

  local version = tonumber(f[2]) + 1
  local created = f[13] or rcall("HGET", fsmKey, "created")  -- `created`: a record an earlier version wrote
  local change = record_event(fsmKey, f[12], created, {s = dest, v = version, a = tonumber(f[3]) or 0,
    n = node, e = event, t = now, ec = ecode, em = emsg, er = eretry})
  -- `done`: the done bucket that counts the job (RetryJob counts it out of that one).
  if ecode ~= "" then  -- the last error is that of this change (its `h<version>`): GetJob's last_error
    change[#change + 1], change[#change + 2] = "err", version
  end
  -- A short result goes in the record (`r`, in pieces), so it expires with it: no key of its own, no expiry
  -- to set. Only a job that succeeds has a result (no transition leaves that state).
  local long = hasResult == "1" and result or nil
  if long and #long <= RESULT_INLINE then
    pieces(change, "r", long)
    long = nil
  end
  -- A lease says nothing once the job has left its node: 0 (2 bytes, not a time's 10) where the record has one.
  if f[5] then
    change[#change + 1], change[#change + 2] = "lease", "0"
  end
  rcall("HSET", fsmKey, "state", dest, "ver", string.format("%d", version), "ev", event, "updated", nowS,
    "done", doneKey, unpack(change))
  local expireAt = string.format("%d", math.max(now, deadline) + retention)
  rcall("PEXPIREAT", fsmKey, expireAt)
  if f[14] then  -- submitted without a payload: no key
  elseif dest == S.failed or dest == S.expired then
    rcall("PEXPIREAT", payloadKey, expireAt)  -- RetryJob needs the input
  else
    rcall("DEL", payloadKey)
  end
  if long then  -- too long for the record: a key of its own, expiring with the record
    rcall("SET", resultKey, long, "PXAT", expireAt)
  end
  add(timersGone, timersKey, lease_member(jobId, tok))
  add(timersGone, timersKey, deadline_member(jobId))
  add(timersGone, timersKey, retry_member(jobId))
  if state == S.queued then  -- only a queued job is in its queue (or in backoff, in the timers)
    add(leaving, queueKey, jobId)
    count_queued(queuedKey, f[15] or created, -1)  -- when it entered QUEUED: `updated`, else its creation
  else
    add(leaving, heldKey, jobId)
  end
  add(counted, pool_of(jobId) .. "|" .. dest, 1)
  local endedIn = NOT_ENDED_INDEXED
  if dest ~= S.succeeded then
    add(ended, endedKey, index_member(jobId))
    endedIn = dest
  end
  add(forgets, timersKey, expireAt)
  add(forgets, timersKey, forget_member(jobId, f[9], endedIn))
  if f[9] then  -- a record written before sessions were indexed has no `sess`
    rcall("PUBLISH", channelPrefix .. f[9], session_done_message(jobId, f[10] or "", dest))
  end
  local ran = -1
  if (state == S.assigned or state == S.running) and f[11] then
    ran = now - tonumber(f[11])
  end
  return {1, dest, version, f[9] or "", state, ran}
end

local replies = {}
for i = 1, (#KEYS - 2) / 7 do
  -- pcall: a job whose commands fail (a record no version wrote) fails alone, as it did in a call of its own
  local ok, reply = pcall(finish, 3 + 7 * (i - 1), 4 + 12 * (i - 1))
  if ok then
    replies[i] = reply
  else
    replies[i] = type(reply) == "table" and reply or {err = tostring(reply)}
  end
end
-- The timers first: the ZREM takes only the jobs' lease, deadline and retry members, never a forget timer.
for _, groups in ipairs({timersGone, leaving}) do
  for _, key in ipairs(groups) do
    rcall("ZREM", key, unpack(groups[key]))
  end
end
for _, key in ipairs(forgets) do
  rcall("ZADD", key, unpack(forgets[key]))
end
for _, key in ipairs(ended) do
  local members = {}
  for i, member in ipairs(ended[key]) do
    members[2 * i - 1], members[2 * i] = 0, member
  end
  rcall("ZADD", key, unpack(members))
end
for _, field in ipairs(counted) do
  count_in(doneKey, field, #counted[field], doneExpiry)
end
return replies
