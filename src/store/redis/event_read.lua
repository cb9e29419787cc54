-- callops: the read of the common delivery (an event whose (call, context) names an
-- existing operation, nothing parked under it), in one round trip, reads only.
-- KEYS[1] the context's index key, KEYS[2] its park, KEYS[3] (when the event has an id) the
-- id's seen key; ARGV[1] the operation key prefix.
-- Returns 'dup' (the id was seen), 'other' (not the common case: the general transition
-- runs), or {holder id, revision, JSON}.
if KEYS[3] and redis.call('EXISTS', KEYS[3]) == 1 then return 'dup' end
local holder = redis.call('GET', KEYS[1])
if not holder or redis.call('EXISTS', KEYS[2]) == 1 then return 'other' end
local found = redis.call('HMGET', ARGV[1] .. holder, 'rev', 'doc')
if not found[1] or not found[2] then return 'other' end
return {holder, found[1], found[2]}
