-- start: mark a job running on a worker, unless it already ended (cancelled while queued).
-- Capitalised names (STATUS_FIELD, TERMINAL, ...) are the prelude's: see dio.protocol.scripts.
-- KEYS[1] job hash
-- ARGV[1] worker id   ARGV[2] now (epoch seconds)
-- Returns 1 the worker may run it, 0 the job is terminal: the worker acknowledges and drops it.
if TERMINAL[redis.call('HGET', KEYS[1], STATUS_FIELD)] then
  return 0
end
redis.call('HSET', KEYS[1], STATUS_FIELD, STATUS.running, JOB_HASH.worker, ARGV[1], JOB_HASH.started_at, ARGV[2])
return 1
