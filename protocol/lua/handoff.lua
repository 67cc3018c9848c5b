-- handoff: move one request from the intake stream to a worker's queue, exactly once.
-- The request is forwarded only if this call's XACK of the intake entry returned 1, so two
-- dispatchers (or a retried call) can never forward it twice, and it is never between streams.
-- Capitalised names (STATUS_FIELD, TERMINAL, ...) are the prelude's: see dio.protocol.scripts.
-- A worker that is not alive and registered gets nothing: a dispatcher that stalled may route on a
-- stale view, and a job queued at a worker that was taken back would wait there for good.
-- KEYS[1] intake stream         KEYS[2] worker queue stream
-- KEYS[3] job hash              KEYS[4] worker's reservations hash
-- KEYS[5] worker's alive key    KEYS[6] registered workers set
-- ARGV[1] intake group  ARGV[2] intake entry id  ARGV[3] job id  ARGV[4] worker id
-- ARGV[5] request JSON  ARGV[6] KV tokens to reserve  ARGV[7] now (epoch seconds)
-- Returns 1 forwarded, 0 entry already handled, -1 job already terminal (cancelled): dropped,
-- -2 the worker is gone: nothing done, the entry stays pending for another route.
if redis.call('EXISTS', KEYS[5]) == 0 or redis.call('SISMEMBER', KEYS[6], ARGV[4]) == 0 then
  return -2
end
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) ~= 1 then
  return 0
end
redis.call('XDEL', KEYS[1], ARGV[2])
if TERMINAL[redis.call('HGET', KEYS[3], STATUS_FIELD)] then
  return -1
end
redis.call('XADD', KEYS[2], '*', JOB_FIELD, ARGV[3], REQUEST_FIELD, ARGV[5])
redis.call('HSET', KEYS[3], STATUS_FIELD, STATUS.dispatched, JOB_HASH.worker, ARGV[4], JOB_HASH.dispatched_at, ARGV[7])
redis.call('HINCRBY', KEYS[3], ATTEMPTS_FIELD, 1)
redis.call('HSET', KEYS[4], ARGV[3], ARGV[6])
return 1
