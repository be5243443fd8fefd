--[[
  Creates a job in state `queued`, or returns the job an earlier submit with the same identity made.

  Input:
    KEYS[1] idempotency key (identity -> job id)
    KEYS[2] job fsm hash
    KEYS[3] job meta (serialized JobSpec without payload)
    KEYS[4] job payload
    KEYS[5] job events list (JSON entries; each is also PUBLISHed on a channel of the same name)
    KEYS[6] partition queue zset
    KEYS[7] partition timers zset
    KEYS[8] partition affinity hash
    ARGV[1] job id
    ARGV[2] meta bytes
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
    ARGV[13] state to create the job in (from the FSM: submit's destination)

  Output:
    {1, job id, state}  created
    {0, job id}         the identity already had this job; nothing changed
]]
local rcall = redis.call
local idemKey, fsmKey, metaKey, payloadKey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local eventsKey, queueKey, timersKey, affinityKey = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local jobId = ARGV[1]

local existing = rcall("GET", idemKey)
if existing then
  return {0, existing}
end

local t = rcall("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local deadline = tonumber(ARGV[6])
if deadline == 0 then
  deadline = now + tonumber(ARGV[7])
end
local retention = tonumber(ARGV[9])
local queueScore = (9 - tonumber(ARGV[4])) * 8796093022208 + now

local preferred = ""
local binding = rcall("HGET", affinityKey, ARGV[10])
if binding then
  local node, at = string.match(binding, "^(.*)|(%d+)$")
  if node and tonumber(at) + tonumber(ARGV[11]) > now then
    preferred = node
  end
end

local state = ARGV[13]
rcall("HSET", fsmKey, "state", state, "ver", 1, "ev", "submit", "att", 0, "maxatt", ARGV[5], "node", "",
  "lease", 0, "dl", deadline, "xto", ARGV[8], "started", 0, "created", now, "updated", now,
  "qs", queueScore, "pref", preferred, "avoid", ",", "sess", ARGV[10])
rcall("SET", metaKey, ARGV[2])
if ARGV[3] ~= "" then
  rcall("SET", payloadKey, ARGV[3])
end
-- The identity outlives no job record: records of finished jobs expire at max(finish, deadline) + retention.
rcall("SET", idemKey, jobId, "PXAT", deadline + retention)
rcall("ZADD", queueKey, queueScore, jobId)
rcall("ZADD", timersKey, deadline, "d:" .. jobId)
local entry = cjson.encode({s = state, v = 1, a = 0, n = "", e = "submit", t = now})
rcall("RPUSH", eventsKey, entry)
rcall("PUBLISH", eventsKey, entry)
rcall("PUBLISH", ARGV[12], jobId .. " " .. preferred)
return {1, jobId, state}
