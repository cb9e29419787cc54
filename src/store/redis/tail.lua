-- callops: a partition's change log after ARGV[1] (at most ARGV[2] entries), with Redis's
-- clock (unix ms) read in the same step: every entry logged later is numbered from that
-- millisecond on (log.lua), so what is below it has all been read.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return {now, redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])}
