-- release: delete a key only while it holds this process's value (a worker's alive key, the
-- active dispatcher's lease), so a process that leaves never removes another one's.
-- KEYS[1] the key
-- ARGV[1] the value this process set (its token or name)
-- Returns 1 deleted, 0 the key holds another value or is gone.
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
