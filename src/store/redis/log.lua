-- callops: appends to a partition's change log (a stream every replica tails) and writes
-- documents, in the same script as the change itself. Arguments from `first` on: the log
-- key, its clock key, the documents hash, the log's approximate length cap, now (unix ms),
-- the partition ('' when the store has one: entries are numbered `n-0` by INCR; else its
-- index: `ms-(p*4096+n)` by Redis's clock, n counting within the millisecond), the number c
-- of change rows, c change rows, then (field, body) pairs of documents (an empty body
-- deletes). No arguments from `first` on: nothing is logged.
local function next_entry_id(clock, part)
  if part == '' then return redis.call('INCR', clock) .. '-0' end
  local t = redis.call('TIME')
  local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local n = 0
  local last = redis.call('GET', clock)
  if last then
    local last_ms, last_n = string.match(last, '(%d+) (%d+)')
    last_ms, last_n = tonumber(last_ms), tonumber(last_n)
    if ms <= last_ms then ms, n = last_ms, last_n + 1 end
    if n >= 4096 then ms, n = ms + 1, 0 end
  end
  redis.call('SET', clock, string.format('%d %d', ms, n))
  return string.format('%d-%d', ms, tonumber(part) * 4096 + n)
end

local function append_log(first)
  if #ARGV < first then return end
  local log, clock, docs, cap, now, part = ARGV[first], ARGV[first + 1], ARGV[first + 2], ARGV[first + 3], ARGV[first + 4], ARGV[first + 5]
  local i = first + 7
  for _ = 1, tonumber(ARGV[first + 6]) do
    redis.call('XADD', log, 'MAXLEN', '~', cap, next_entry_id(clock, part), 't', 'c', 'at', now, 'b', ARGV[i])
    i = i + 1
  end
  while i < #ARGV do
    local field, body = ARGV[i], ARGV[i + 1]
    if body == '' then redis.call('HDEL', docs, field) else redis.call('HSET', docs, field, body) end
    redis.call('XADD', log, 'MAXLEN', '~', cap, next_entry_id(clock, part), 't', 'd', 'at', now, 'k', field, 'b', body)
    i = i + 2
  end
end
