--[[
  Gives back what admit_jobs took for jobs that were not created after all (the rest of the batch was
  refused, or a job of the batch already existed: a repeat costs nothing): their tokens, and their
  places among the tenant's unfinished jobs.

  Input:
    KEYS[1] tenant bucket hash (tokens, ts)
    KEYS[2] tenant jobs zset (job id -> deadline ms)
    ARGV[1] submit rate, jobs per second (0: no rate limit, no tokens to give back)
    ARGV[2] burst
    ARGV[3], ... the job ids admitted but not created

  Output:
    {1}
]]
local bucketKey, jobsKey = KEYS[1], KEYS[2]
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local n = #ARGV - 2
if rate > 0 then
  local b = rcall("HMGET", bucketKey, "tokens", "ts")
  if b[1] then  -- no bucket: it is full already
    local now = now_ms()
    local tokens = tonumber(b[1]) + math.max(0, now - tonumber(b[2])) * rate / 1000
    rcall("HSET", bucketKey, "tokens", math.min(burst, tokens + n), "ts", now)
  end
end
rcall("ZREM", jobsKey, unpack(ARGV, 3))
return {1}
