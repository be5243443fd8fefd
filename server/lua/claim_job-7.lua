--[[
  Claims one queued job for a node: queued -> assigned, attempt + 1, ack lease starts.

  Input:
    KEYS[1] partition queue zset
    KEYS[2] partition timers zset
    KEYS[3] partition affinity hash
    KEYS[4] job fsm hash
    KEYS[5] job meta
    KEYS[6] job payload
    KEYS[7] job events list (JSON entries; each is also PUBLISHed on a channel of the same name)
    ARGV[1] job id (a candidate read from the queue earlier)
    ARGV[2] node id
    ARGV[3] ack timeout, ms
    ARGV[4] affinity wait, ms: how long a job is held back for its session's preferred node
    ARGV[5] state a claim starts from (from the FSM: assign's source)
    ARGV[6] state a claim leads to (from the FSM: assign's destination)
    ARGV[7] how many queue heads to return as the next candidates
    ARGV[8] avoid window, ms: how long a requeued job keeps away from the nodes it avoids

  Output: {code, next candidates, ...}
    {1, candidates, attempt, lease deadline ms, meta, payload}  claimed
    {-1, candidates}         job not found (its queue entry is dropped)
    {-2, candidates, state}  job not in the claimable state (its queue entry is dropped)
    {-7, candidates}         job no longer in the queue (someone else claimed it)
    {-8, candidates, until}  the job avoids this node until `until` (ms): the node lost it or lacked the model
    {-9, candidates, until}  the job is held back for its session's node until `until` (ms)
]]
local rcall = redis.call
local queueKey, timersKey, affinityKey = KEYS[1], KEYS[2], KEYS[3]
local fsmKey, metaKey, payloadKey, eventsKey = KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local jobId, nodeId = ARGV[1], ARGV[2]

local function heads()
  return rcall("ZRANGE", queueKey, 0, tonumber(ARGV[7]) - 1)
end

if not rcall("ZSCORE", queueKey, jobId) then
  return {-7, heads()}
end
local f = rcall("HMGET", fsmKey, "state", "ver", "att", "avoid", "pref", "updated", "sess")
local state = f[1]
if not state then
  rcall("ZREM", queueKey, jobId)
  return {-1, heads()}
end
if state ~= ARGV[5] then
  rcall("ZREM", queueKey, jobId)
  return {-2, heads(), state}
end
local t = rcall("TIME")
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local avoidUntil = tonumber(f[6]) + tonumber(ARGV[8])
if now < avoidUntil and string.find(f[4], "," .. nodeId .. ",", 1, true) then
  return {-8, heads(), avoidUntil}
end
local heldUntil = tonumber(f[6]) + tonumber(ARGV[4])
if f[5] ~= "" and f[5] ~= nodeId and now < heldUntil then
  return {-9, heads(), heldUntil}
end

local version = tonumber(f[2]) + 1
local attempt = tonumber(f[3]) + 1
local lease = now + tonumber(ARGV[3])
rcall("ZREM", queueKey, jobId)
rcall("HSET", fsmKey, "state", ARGV[6], "ver", version, "ev", "assign", "att", attempt, "node", nodeId,
  "lease", lease, "started", 0, "updated", now)
rcall("ZADD", timersKey, lease, "l:" .. jobId)
rcall("HSET", affinityKey, f[7], nodeId .. "|" .. now)
local entry = cjson.encode({s = ARGV[6], v = version, a = attempt, n = nodeId, e = "assign", t = now})
rcall("RPUSH", eventsKey, entry)
rcall("PUBLISH", eventsKey, entry)
return {1, heads(), attempt, lease, rcall("GET", metaKey), rcall("GET", payloadKey) or ""}
