-- submit: create a job and put its request on the intake, unless a job with this id exists.
-- Clients choose job ids; reusing one must never overwrite that job (its status, its output, a
-- second notice): the submission is refused instead, and the SDK raises DuplicateJobId.
-- The intake is never trimmed: a trimmed entry would be a request silently lost.
-- Capitalised names (STATUS_FIELD, TERMINAL, ...) are the prelude's: see dio.protocol.scripts.
-- KEYS[1] job hash   KEYS[2] intake stream
-- ARGV[1] request JSON   ARGV[2..] field, value pairs of the new job hash (status, submitted_at, ...)
-- Returns 1 submitted, 0 refused: a job with this id exists.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
local fields = {}
for i = 2, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', KEYS[1], unpack(fields))
redis.call('XADD', KEYS[2], '*', REQUEST_FIELD, ARGV[1])
return 1
