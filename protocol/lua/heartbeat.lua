-- heartbeat: renew a worker's alive key and its hash, if this process owns the worker id.
-- A worker id is owned by the process whose random token its alive key holds. The key is taken
-- when absent (SET NX in effect): at start, or when the worker's heartbeat lapsed (a stall) and
-- the dispatcher took its jobs back and removed it from the worker set. Then the worker is
-- registered anew, its hash rewritten from scratch and its id put back in the set, so it gets
-- work again. A key holding another token is another live process's: nothing is written.
-- The capabilities (WorkerInfo: up to a chat template of many KB) are sent and written only when
-- the worker registers (or its hash lost them): a renewal sends and writes the telemetry only,
-- and a call that must register but brought no capabilities writes nothing and returns 3, so
-- that the caller sends them.
-- KEYS[1] alive key   KEYS[2] worker set   KEYS[3] worker hash
-- ARGV[1] this process's token   ARGV[2] alive TTL in milliseconds   ARGV[3] worker id
-- ARGV[4] n: how many of the next arguments are capability field, value pairs (an even number)
-- ARGV[5 .. 4+n] capability pairs; ARGV[5+n ..] telemetry field, value pairs
-- Returns 1 renewed, 2 registered anew (the alive key or the set membership was missing),
-- 0 another process owns the worker id, 3 registration needs the capabilities (nothing written).
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
  return 0
end
local anew = not holder or redis.call('SISMEMBER', KEYS[2], ARGV[3]) == 0
local registering = anew or redis.call('EXISTS', KEYS[3]) == 0
local n = tonumber(ARGV[4])
if registering and n == 0 then
  return 3
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
if not holder then
  redis.call('DEL', KEYS[3])  -- fields of a previous life are not this one's
end
redis.call('SADD', KEYS[2], ARGV[3])
local fields = {}
local first = 5 + n
if registering then
  first = 5
end
for i = first, #ARGV do fields[#fields + 1] = ARGV[i] end
if #fields > 0 then
  redis.call('HSET', KEYS[3], unpack(fields))
end
if anew then
  return 2
end
return 1
