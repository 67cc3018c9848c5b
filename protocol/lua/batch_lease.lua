-- batch_lease.lua: take over, renew or release a batch runner's lease (dio.client.batch_lease).
--
-- KEYS[1]  P batch:<id>:lease   string  the holder's JSON, with a TTL
-- ARGV[1]  op                   "take" | "renew" | "release"
-- ARGV[2]  expected             the value the lease must hold now (take: the old holder's; else ours)
-- ARGV[3]  value                our holder JSON (take, renew)
-- ARGV[4]  ttl_ms               the lease's new TTL (take, renew)
--
-- Returns 1 when done, 0 when the lease holds another value (someone else took it first, or ours
-- expired): the caller then neither writes to the batch nor takes it.
local current = redis.call('GET', KEYS[1])
if current ~= ARGV[2] then
  return 0
end
if ARGV[1] == 'release' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[3], 'PX', tonumber(ARGV[4]))
end
return 1
