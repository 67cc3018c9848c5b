-- requeue: take a job back from a worker's queue (the worker died, or it has not started the job)
-- and put it on the intake stream again, so the dispatcher routes it anew.
-- Capitalised names (STATUS_FIELD, TERMINAL, ...) are the prelude's: see dio.protocol.scripts.
-- KEYS[1] worker queue stream   KEYS[2] intake stream   KEYS[3] job hash
-- KEYS[4] worker's reservations hash
-- ARGV[1] queue group   ARGV[2] queue entry id   ARGV[3] job id   ARGV[4] request JSON
-- ARGV[5] worker id   ARGV[6] how many taken-back-from workers the job hash keeps (DIED_ON_FIELD)
-- Returns 1 requeued, 0 entry already gone (the worker finished it), -1 job already terminal.
if redis.call('XDEL', KEYS[1], ARGV[2]) ~= 1 then
  return 0
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
redis.call('HDEL', KEYS[4], ARGV[3])
if TERMINAL[redis.call('HGET', KEYS[3], STATUS_FIELD)] then
  return -1
end
-- The job's history for the poison rule's dead-letter entry: the workers it was taken back from.
local died_on = {}
local kept = redis.call('HGET', KEYS[3], DIED_ON_FIELD)
if kept then
  local ok, decoded = pcall(cjson.decode, kept)
  if ok and type(decoded) == 'table' then died_on = decoded end
end
died_on[#died_on + 1] = ARGV[5]
while #died_on > tonumber(ARGV[6]) do table.remove(died_on, 1) end
redis.call('HSET', KEYS[3], STATUS_FIELD, STATUS.queued, DIED_ON_FIELD, cjson.encode(died_on))
redis.call('XADD', KEYS[2], '*', REQUEST_FIELD, ARGV[4])
return 1
