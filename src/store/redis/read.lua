-- callops: what one transition reads, in one round trip (reads only).
-- ARGV[1] (JSON): ctx = [[index key, park key]...], up = [upstream keys], calls = [call
-- keys], ops = [operation ids], op = the operation key prefix.
-- Returns {context holders, parks (lists of events), upstream holders, operations as
-- [id, revision, JSON]}: holders are nil when absent; every operation a holder or a call
-- names is read too.
local arg = cjson.decode(ARGV[1])
local holders, parks, ups, ids, wanted = {}, {}, {}, {}, {}
local function want(id)
  if id and not wanted[id] then
    wanted[id] = true
    ids[#ids + 1] = id
  end
end
for i, names in ipairs(arg.ctx) do
  local holder = redis.call('GET', names[1])
  holders[i] = holder
  parks[i] = redis.call('LRANGE', names[2], 0, -1)
  want(holder)
end
for i, key in ipairs(arg.up) do
  local holder = redis.call('GET', key)
  ups[i] = holder
  want(holder)
end
for _, key in ipairs(arg.calls) do
  for _, id in ipairs(redis.call('SMEMBERS', key)) do want(id) end
end
for _, id in ipairs(arg.ops) do want(id) end
local ops = {}
for _, id in ipairs(ids) do
  local found = redis.call('HMGET', arg.op .. id, 'rev', 'doc')
  if found[1] and found[2] then ops[#ops + 1] = {id, found[1], found[2]} end
end
return {holders, parks, ups, ops}
