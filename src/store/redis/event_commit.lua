-- callops: the write of the common delivery (one operation changed, one event id seen),
-- all or nothing, given the operation as the caller last knew it (read, or this replica's
-- cache). Positional arguments: no JSON to decode.
-- KEYS: [1] the operation, [2] its context's index key, [3] the context's park, [4] the
-- expiries index, [5] the deadlines index, [6] the event id's seen key (when ARGV[9] is
-- '1'), then the operation's other names (its upstream id).
-- ARGV: [1] id, [2] revision known, [3] new revision, [4] JSON, [5] ttl (ms), [6] when it
-- expires (unix ms), [7] callback deadline (unix ms; '0' once settled), [8] the settle
-- channel ('' unless settled), [9] '1' with a seen key, [10] its ttl (ms), [11] the
-- operation key prefix, [12..] the change log's (log.lua).
-- Returns 'ok', 'dup' (the id was seen: nothing written), 'other' (no longer the common
-- case: nothing written, the general transition runs) or, when the operation changed or
-- its context names another, {holder id, revision, JSON} as event_read.lua reads them
-- (nothing written; the caller applies the event to that and writes again).
local id = ARGV[1]
local holder = redis.call('GET', KEYS[2])
if not holder or redis.call('EXISTS', KEYS[3]) == 1 then return 'other' end
if holder ~= id or (redis.call('HGET', KEYS[1], 'rev') or '') ~= ARGV[2] then
  local found = redis.call('HMGET', ARGV[11] .. holder, 'rev', 'doc')
  if not found[1] or not found[2] then return 'other' end
  return {holder, found[1], found[2]}
end
local names = 6
if ARGV[9] == '1' then
  names = 7
  -- SET NX is the duplicate check: nothing was written before it.
  if not redis.call('SET', KEYS[6], '1', 'NX', 'PX', ARGV[10]) then return 'dup' end
end
redis.call('HSET', KEYS[1], 'rev', ARGV[3], 'doc', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
-- The names that find it live as long as it does.
redis.call('PEXPIRE', KEYS[2], ARGV[5])
for i = names, #KEYS do
  if redis.call('GET', KEYS[i]) == id then redis.call('PEXPIRE', KEYS[i], ARGV[5]) end
end
redis.call('ZADD', KEYS[4], ARGV[6], id)
if ARGV[7] ~= '0' then
  redis.call('ZADD', KEYS[5], ARGV[7], id)
else
  redis.call('ZREM', KEYS[5], id)
end
if ARGV[8] ~= '' then redis.call('PUBLISH', ARGV[8], id) end
-- The change log from ARGV[12] on (log.lua, prepended to this script).
append_log(12)
return 'ok'
