-- finish: write a job's terminal state once, acknowledge its stream entry, notify the client.
-- A job already terminal is left as it is (a redelivered job cannot produce a second visible
-- result); its stream entry is still acknowledged so it is not delivered again.
-- Capitalised names (STATUS_FIELD, TERMINAL, ...) are the prelude's: see dio.protocol.scripts.
-- KEYS[1] job hash           KEYS[2] reservations hash of the worker (any key when none)
-- KEYS[3] stream to ack      KEYS[4] completions stream      KEYS[5] client's reply stream
-- ARGV[1] group of KEYS[3]   ARGV[2] entry id to ack ('' = none)   ARGV[3] job id
-- ARGV[4] job TTL seconds    ARGV[5] completion JSON ('' = none)
-- ARGV[6] comma-separated job-hash fields to send as the client's notice ('' = no notice)
-- ARGV[7] reply stream max length   ARGV[8] reply stream TTL seconds   ARGV[9] completions max length
-- ARGV[10] owner: write the terminal state only while the job hash names this worker ('' = any);
--          a worker's copy aborted because the job moved to another worker must not end it there
-- ARGV[11..] field, value pairs for the job hash (must include STATUS_FIELD)
-- Returns 1 written, 0 already terminal, -1 not the owner's (the job is another worker's now).
if ARGV[2] ~= '' then
  redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[3], ARGV[2])
end
-- The worker's KV is free and it is done with the job, whatever the job's state: release the
-- reservation and report the completion even for a job that a client cancelled meanwhile.
redis.call('HDEL', KEYS[2], ARGV[3])
if ARGV[5] ~= '' then
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[9], '*', COMPLETION_FIELD, ARGV[5])
end
local job = redis.call('HMGET', KEYS[1], STATUS_FIELD, JOB_HASH.worker)
if TERMINAL[job[1]] then
  return 0
end
if ARGV[10] ~= '' and job[2] and job[2] ~= ARGV[10] then
  return -1
end
local fields = {}
for i = 11, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
if ARGV[6] ~= '' then
  -- The notice is the whole terminal state as the job hash now holds it (timings written by the
  -- client, dispatcher and worker included), as JSON.
  local notice = {v = SCHEMA_VERSION, id = ARGV[3]}
  for name in string.gmatch(ARGV[6], '[^,]+') do
    local value = redis.call('HGET', KEYS[1], name)
    if value == '[]' then value = nil end  -- cjson would encode an empty table as an object
    if value and JSON_FIELDS[name] then value = cjson.decode(value) end
    if value then notice[name] = value end
  end
  redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[7], '*', RESULT_FIELD, cjson.encode(notice))
  redis.call('EXPIRE', KEYS[5], tonumber(ARGV[8]))
end
return 1
