-- callops: one transition of the shared store, all or nothing.
-- ARGV[1] is the plan (JSON, built by plan.rs), ARGV[2..] the operations' JSON (each
-- plan.ops entry names its own by index), then the change log's arguments (log.lua); KEYS[1] only routes the script (every key
-- shares the prefix's hash tag, so a cluster keeps them in one slot).
-- Returns 'dup' (an event id was seen before: nothing written), 'conflict' (something read
-- for this transition changed since: nothing written, read again), or 'ok'.
local plan = cjson.decode(ARGV[1])

-- 1. Checks, before anything is written.
for _, key in ipairs(plan.seen) do
  if redis.call('EXISTS', key) == 1 then return 'dup' end
end
for _, op in ipairs(plan.ops) do
  local rev = redis.call('HGET', op.key, 'rev') or ''
  if rev ~= op.base then return 'conflict' end
end
for _, claim in ipairs(plan.claims) do
  if claim.check and (redis.call('GET', claim.key) or '') ~= claim.expect then
    return 'conflict'
  end
end
for _, parked in ipairs(plan.parked) do
  if parked.expect >= 0 and redis.call('LLEN', parked.key) ~= parked.expect then
    return 'conflict'
  end
end

-- 2. Writes.
-- The dedupe records: SET NX with an expiry (checked above, inside this same script).
for _, key in ipairs(plan.seen) do
  redis.call('SET', key, '1', 'NX', 'PX', plan.seen_ttl)
end
for _, op in ipairs(plan.ops) do
  redis.call('HSET', op.key, 'rev', op.rev, 'doc', ARGV[op.doc])
  redis.call('PEXPIRE', op.key, op.ttl)
  redis.call('ZADD', plan.expiries, plan.now + op.ttl, op.id)
  -- The names that find it live as long as it does (if they still name it).
  for _, name in ipairs(op.names) do
    if redis.call('GET', name) == op.id then redis.call('PEXPIRE', name, op.ttl) end
  end
  if op.new then
    redis.call('ZADD', plan.all, 0, op.id)
    redis.call('SADD', op.call, op.id)
    redis.call('PEXPIRE', op.call, plan.call_ttl)
  end
  if op.deadline > 0 then
    redis.call('ZADD', plan.deadlines, op.deadline, op.id)
  else
    redis.call('ZREM', plan.deadlines, op.id)
  end
  if op.settled then redis.call('PUBLISH', plan.channel, op.id) end
end
for _, claim in ipairs(plan.claims) do
  if claim.set ~= '' then redis.call('SET', claim.key, claim.set, 'PX', claim.ttl) end
end
for _, parked in ipairs(plan.parked) do
  if parked.clear then
    redis.call('DEL', parked.key)
    redis.call('ZREM', plan.park_due, parked.name)
  end
  if #parked.push > 0 then
    for _, event in ipairs(parked.push) do redis.call('RPUSH', parked.key, event) end
    redis.call('PEXPIRE', parked.key, plan.park_keep)
    redis.call('ZADD', plan.park_due, parked.due, parked.name)
  end
end
for _, timeline in ipairs(plan.timelines) do
  for _, event in ipairs(timeline.push) do redis.call('RPUSH', timeline.key, event) end
  redis.call('LTRIM', timeline.key, -plan.timeline_max, -1)
  redis.call('PEXPIRE', timeline.key, plan.call_ttl)
end
-- The change log after the operations' JSON (log.lua, prepended to this script).
append_log(2 + #plan.ops)
return 'ok'
