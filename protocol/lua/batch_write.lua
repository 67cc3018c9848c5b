-- batch_write.lua: append one output record of a batch, if the writer still holds its lease.
--
-- KEYS[1]  P batch:<id>:lease      string  the runner's holder JSON
-- KEYS[2]  P file:<id>:data        string  the output (or error) file's content, grown by APPEND
-- KEYS[3]  P batch:<id>:inflight   hash    job id -> custom_id of the batch's jobs in flight
-- KEYS[4]  P batch:<id>            hash    the batch (its request counts)
-- KEYS[5]  P file:<id>             hash    the file's metadata (its byte count)
-- ARGV[1]  holder                  the writer's holder JSON
-- ARGV[2]  line                    the record, as one JSON line with its newline
-- ARGV[3]  job_id                  the job that answered it ("" for a line that never became a job)
-- ARGV[4]  count                   the batch-hash counter to increment: "completed" or "failed"
--
-- Returns 1 when written, 0 when the lease is not the writer's (nothing written: the runner that
-- holds it now answers the line). The record, the in-flight entry's removal and the count change
-- together, so a runner killed at any point leaves each request either answered or in flight.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local size = redis.call('APPEND', KEYS[2], ARGV[2])
redis.call('HSET', KEYS[5], 'bytes', size)
if ARGV[3] ~= '' then
  redis.call('HDEL', KEYS[3], ARGV[3])
end
redis.call('HINCRBY', KEYS[4], ARGV[4], 1)
return 1
