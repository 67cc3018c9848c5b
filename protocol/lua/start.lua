-- start: mark a job running on a worker, unless it already ended (cancelled while queued, or
-- finished by another worker: one it was taken back from after a stall finished it after all) or
-- was taken back from this worker meanwhile (requeued after a stall: it waits on the intake again,
-- or was handed to another worker, which runs it now).
-- Capitalised names (STATUS_FIELD, TERMINAL, ...) are the prelude's: see dio.protocol.scripts.
-- KEYS[1] job hash   KEYS[2] this worker's reservations hash
-- ARGV[1] worker id   ARGV[2] now (epoch seconds)   ARGV[3] job id
-- Returns 1 the worker may run it, 0 the job ended or is not this worker's any more: its KV
-- reservation on this worker is released (it will not run here), and the worker acknowledges and
-- drops the entry.
local job = redis.call('HMGET', KEYS[1], STATUS_FIELD, JOB_HASH.worker)
local status, worker = job[1], job[2]
if TERMINAL[status] or status == STATUS.queued or (worker and worker ~= ARGV[1]) then
  redis.call('HDEL', KEYS[2], ARGV[3])
  return 0
end
redis.call('HSET', KEYS[1], STATUS_FIELD, STATUS.running, JOB_HASH.worker, ARGV[1], JOB_HASH.started_at, ARGV[2])
return 1
