-- start: mark a job running on a worker, unless it already ended (cancelled while queued).
-- KEYS[1] job hash
-- ARGV[1] worker id   ARGV[2] now (epoch seconds)
-- Returns 1 the worker may run it, 0 the job is terminal: the worker acknowledges and drops it.
local status = redis.call('HGET', KEYS[1], 'status')
if status == 'completed' or status == 'rejected' or status == 'failed' or status == 'cancelled' then
  return 0
end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1], 'started_at', ARGV[2])
return 1
