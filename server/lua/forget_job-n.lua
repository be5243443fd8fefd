--[[
  Takes finished jobs of one shard out of ListJobs' indexes when their keys expire: run by the sweeper for
  their forget timers (`x:<job id> <tenant> <ended state or ->`, set by lua/finish_job-n.lua at
  max(finish, deadline) + retention). A member carries what its forget needs: the record is gone by then.
  A job acts only if this call removes its timer, so two sweepers firing the same timer act once, and a
  RetryJob in between (which removes the timer, lua/retry_job-12.lua) keeps the entries.

  One call takes a sweep's due forget timers of one shard (server/store.py's forget): one ZMSCORE reads
  every timer, then one ZREM takes the timers that act and one ZREM per index key their entries.

  Input (the key count varies: 1 + 3 per job, file name `-n`; 3 arguments per job):
    KEYS[1] the shard's timers zset
    KEYS[2 + 3(i-1)] ... KEYS[4 + 3(i-1)], job i's:
      +0 partition jobs index (ListJobs by pool)
      +1 tenant jobs index of the shard
      +2 the shard's index of jobs ended in the timer's state (written only for an ended state: the name
         for "-" is never written)
    ARGV[1 + 3(i-1)] ... ARGV[3 + 3(i-1)], job i's:
      +0 the forget timer member
      +1 job id
      +2 the timer's ended state, or "-" (NOT_ENDED_INDEXED: the job is in no ended index)

  Output: one reply per job, in order:
    1    the job left the indexes
    0    the timer was gone already (another sweeper, a RetryJob, or the same timer earlier in this call);
         nothing changed
    -10  not due by Redis' clock (a sweeper whose own clock runs ahead); nothing changed
    an error  an index of the job could not be written (a key of another type): its timer is gone, its
         other indexes lost its entries; the other jobs go on
]]
local timersKey = KEYS[1]
local members = {}
for i = 1, #ARGV / 3 do
  members[i] = ARGV[3 * i - 2]
end
local dues = rcall("ZMSCORE", timersKey, unpack(members))
local now  -- Redis time (TIME is the only clock), read once: for the first timer found
local gone, taken, leaving, owners, replies = {}, {}, {}, {}, {}  -- owners: key -> the jobs with an entry there
for i, member in ipairs(members) do
  local due = tonumber(dues[i])
  if not due or taken[member] then
    replies[i] = 0
  else
    now = now or now_ms()
    if due > now then  -- the record has not expired yet
      replies[i] = -10
    else
      taken[member] = true
      gone[#gone + 1] = member
      local k, entry = 2 + 3 * (i - 1), index_member(ARGV[3 * i - 1])
      for j = k, ARGV[3 * i] ~= NOT_ENDED_INDEXED and k + 2 or k + 1 do
        add(leaving, KEYS[j], entry)
        add(owners, KEYS[j], i)
      end
      replies[i] = 1
    end
  end
end
if gone[1] then
  rcall("ZREM", timersKey, unpack(gone))
  -- Each index on its own: one that fails (a key of another type: no scheduler wrote it) fails the jobs
  -- with an entry there, each reply in its place, and the other indexes still lose their entries.
  for _, key in ipairs(leaving) do
    local done = redis.pcall("ZREM", key, unpack(leaving[key]))
    if type(done) == "table" and done.err then
      for _, i in ipairs(owners[key]) do
        replies[i] = done
      end
    end
  end
end
return replies
