--[[
  Admits a Submit batch's new jobs of one tenant, or refuses them all: the tenant's submit-rate token
  bucket (shared by every instance) and its limit on unfinished jobs. Refused: nothing changes.

  Input:
    KEYS[1] tenant bucket hash (tokens, ts: the token bucket as of ts, ms)
    KEYS[2] tenant jobs zset (job id -> deadline ms): its unfinished jobs; finished ones are removed by
            the instance that finished them, and any whose deadline passed are dropped here
    ARGV[1] submit rate, jobs per second (0: no rate limit)
    ARGV[2] burst: most tokens the bucket holds
    ARGV[3] most unfinished jobs (0: no limit)
    ARGV[4] default time to live, ms (a job's deadline when it gives 0)
    ARGV[5], ARGV[6], ... job id, deadline ms (0: now + ARGV[4]), one pair per job

  Output:
    {1}                     admitted: tokens taken, jobs counted
    {-12, count}            refused: the tenant has `count` unfinished jobs; the batch would pass its limit
    {-13, retry ms}         refused: not enough tokens; retry ms is when there will be
]]
local bucketKey, jobsKey = KEYS[1], KEYS[2]
local rate, burst, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local n = (#ARGV - 4) / 2
local now = now_ms()

if limit > 0 then
  rcall("ZREMRANGEBYSCORE", jobsKey, "-inf", now)
  local count = rcall("ZCARD", jobsKey)
  if count + n > limit then
    return {-12, count}
  end
end
local tokens = burst
if rate > 0 then
  local b = rcall("HMGET", bucketKey, "tokens", "ts")
  if b[1] then
    tokens = math.min(burst, tonumber(b[1]) + math.max(0, now - tonumber(b[2])) * rate / 1000)
  end
  if tokens < n then
    return {-13, math.ceil((n - tokens) * 1000 / rate)}
  end
  -- A bucket left alone refills to full: once it would be, the key may go.
  rcall("HSET", bucketKey, "tokens", tokens - n, "ts", now)
  rcall("PEXPIRE", bucketKey, math.ceil(burst * 1000 / rate) + 1000)
end
if limit > 0 then
  local latest = 0
  for i = 5, #ARGV, 2 do
    local deadline = tonumber(ARGV[i + 1])
    if deadline == 0 then
      deadline = now + tonumber(ARGV[4])
    end
    rcall("ZADD", jobsKey, deadline, ARGV[i])
    latest = math.max(latest, deadline)
  end
  local ttl = rcall("PTTL", jobsKey)
  if ttl < 0 or now + ttl < latest then
    rcall("PEXPIREAT", jobsKey, latest)
  end
end
return {1}
