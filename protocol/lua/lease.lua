-- lease: take or renew the active-dispatcher lease. One dispatcher is active; standbys retry.
-- KEYS[1] lease key
-- ARGV[1] this dispatcher's name   ARGV[2] lease TTL in milliseconds
-- Returns 1 this dispatcher holds the lease (taken or renewed), 0 another one holds it.
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
  return 1
end
if holder then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
return 1
