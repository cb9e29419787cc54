-- callops: the write of the common delivery (one operation changed, one event id seen),
-- all or nothing. Positional arguments: no JSON to decode.
-- KEYS: [1] the operation, [2] its context's index key, [3] the expiries index, [4] the
-- deadlines index, [5] the event id's seen key (when ARGV[9] is '1'), then the operation's
-- other names (its upstream id).
-- ARGV: [1] id, [2] revision read, [3] new revision, [4] JSON, [5] ttl (ms), [6] when it
-- expires (unix ms), [7] callback deadline (unix ms; '0' once settled), [8] the settle
-- channel ('' unless settled), [9] '1' with a seen key, [10] its ttl (ms), [11..] the
-- change log's (log.lua).
-- Returns 'conflict' (the operation changed, or its context names another: nothing
-- written, read again), 'dup' (the id was seen: nothing written) or 'ok'.
local id = ARGV[1]
if (redis.call('HGET', KEYS[1], 'rev') or '') ~= ARGV[2] then return 'conflict' end
if redis.call('GET', KEYS[2]) ~= id then return 'conflict' end
local names = 5
if ARGV[9] == '1' then
  names = 6
  -- SET NX is the duplicate check: nothing was written before it.
  if not redis.call('SET', KEYS[5], '1', 'NX', 'PX', ARGV[10]) then return 'dup' end
end
redis.call('HSET', KEYS[1], 'rev', ARGV[3], 'doc', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
-- The names that find it live as long as it does.
redis.call('PEXPIRE', KEYS[2], ARGV[5])
for i = names, #KEYS do
  if redis.call('GET', KEYS[i]) == id then redis.call('PEXPIRE', KEYS[i], ARGV[5]) end
end
redis.call('ZADD', KEYS[3], ARGV[6], id)
if ARGV[7] ~= '0' then
  redis.call('ZADD', KEYS[4], ARGV[7], id)
else
  redis.call('ZREM', KEYS[4], id)
end
if ARGV[8] ~= '' then redis.call('PUBLISH', ARGV[8], id) end
-- The change log from ARGV[11] on (log.lua, prepended to this script).
append_log(11)
return 'ok'
