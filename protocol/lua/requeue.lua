-- requeue: take a job back from a worker's queue (the worker died, or it has not started the job)
-- and put it on the intake stream again, so the dispatcher routes it anew.
-- Capitalised names (STATUS_FIELD, TERMINAL, ...) are the prelude's: see dio.protocol.scripts.
-- KEYS[1] worker queue stream   KEYS[2] intake stream   KEYS[3] job hash
-- KEYS[4] worker's reservations hash
-- ARGV[1] queue group   ARGV[2] queue entry id   ARGV[3] job id   ARGV[4] request JSON
-- Returns 1 requeued, 0 entry already gone (the worker finished it), -1 job already terminal.
if redis.call('XDEL', KEYS[1], ARGV[2]) ~= 1 then
  return 0
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('HDEL', KEYS[4], ARGV[3])
if TERMINAL[redis.call('HGET', KEYS[3], STATUS_FIELD)] then
  return -1
end
redis.call('HSET', KEYS[3], STATUS_FIELD, STATUS.queued)
redis.call('XADD', KEYS[2], '*', REQUEST_FIELD, ARGV[4])
return 1
