-- callops: appends to the change log (a stream every replica tails) and writes documents,
-- in the same script as the change itself. Arguments from `first` on: the log key, its
-- sequence key, the documents hash, the log's approximate length cap, now (unix ms), the
-- number c of change rows, c change rows, then (field, body) pairs of documents (an
-- empty body deletes). No arguments from `first` on: nothing is logged.
local function append_log(first)
  if #ARGV < first then return end
  local log, seq, docs, cap, now = ARGV[first], ARGV[first + 1], ARGV[first + 2], ARGV[first + 3], ARGV[first + 4]
  local i = first + 6
  for _ = 1, tonumber(ARGV[first + 5]) do
    local n = redis.call('INCR', seq)
    redis.call('XADD', log, 'MAXLEN', '~', cap, n .. '-0', 't', 'c', 'at', now, 'b', ARGV[i])
    i = i + 1
  end
  while i < #ARGV do
    local field, body = ARGV[i], ARGV[i + 1]
    if body == '' then redis.call('HDEL', docs, field) else redis.call('HSET', docs, field, body) end
    local n = redis.call('INCR', seq)
    redis.call('XADD', log, 'MAXLEN', '~', cap, n .. '-0', 't', 'd', 'at', now, 'k', field, 'b', body)
    i = i + 2
  end
end
