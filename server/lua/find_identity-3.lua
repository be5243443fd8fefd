--[[
  The job a submit's identity has already, if any (read only): what submit_job would answer as a
  repeat (or as a conflict: its job in another source language). Quotas ask it for the jobs of a refused
  batch, so that a repeat is not counted again.

  Input:
    KEYS[1] idempotency key (as submit_job's KEYS[k+1])
    KEYS[2] session jobs zset (as submit_job's KEYS[k+4])
    KEYS[3] shard pools zset (as submit_job's KEYS[7])
    ARGV[1] the job id the submit would create (its partition tag: the identity's pool)
    ARGV[2] utterance index
    ARGV[3] "1" when the identity is the spec's idempotency key, "" for the default identity

  Output:
    the job id, or nil when the identity has no job
]]
return identity_job(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3] == "1")
