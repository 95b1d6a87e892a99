"""The Lua scripts of the queue: each makes one multi-step state change atomic on the Redis server.

They are kept apart from :mod:`worker.client.queue` so that the protocol of each (KEYS, ARGV, reply) sits next to its
code. Every script touches only the keys it is given in ``KEYS`` (never a name built inside Lua), as Redis
requires, and callers build those with :meth:`worker.client.defaults.QueueConfig.key`, so all of them carry the
deployment's hash tag and hash to one Redis Cluster slot (``tests/test_cluster_keys.py`` checks both).
"""

# Enqueue all jobs or none, and only while the stream stays within the bound, so that concurrent submitters cannot
# overshoot it between a length check and an add. KEYS: stream. ARGV: bound, n, then per job a field count and
# the flat field/value pairs. Returns {1, length, ids...} or {0, length}.
SUBMIT = """
local len = redis.call('XLEN', KEYS[1])
local n = tonumber(ARGV[2])
if len + n > tonumber(ARGV[1]) then return {0, len} end
local out, pos = {1, len}, 3
for i = 1, n do
  local cnt = tonumber(ARGV[pos]); pos = pos + 1
  local args = {KEYS[1], '*'}
  for j = 1, cnt do args[#args + 1] = ARGV[pos + j - 1] end
  pos = pos + cnt
  out[#out + 1] = redis.call('XADD', unpack(args))
end
return out
"""

# Answer a job at most once, optionally dead-letter it, and always retire its stream entry. KEYS: done, res,
# stream, dead. ARGV: group, entry id ('' if none), payload, ttl, marker value, dead maxlen ('' = not dead), then
# dead-letter field/value pairs. Returns 1 if this call delivered the answer, 0 if the job was already answered.
# The "answered" marker is set last: a script that fails half-way keeps what it wrote, and a marker without its
# answer would leave the waiter with nothing for ever.
FINISH = """
local delivered = 0
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('RPUSH', KEYS[2], ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
  redis.call('SET', KEYS[1], ARGV[5], 'EX', ARGV[4])
  delivered = 1
end
if ARGV[6] ~= '' then
  local args = {KEYS[4], 'MAXLEN', '~', ARGV[6], '*'}
  for i = 7, #ARGV do args[#args + 1] = ARGV[i] end
  redis.call('XADD', unpack(args))
end
if ARGV[2] ~= '' then
  redis.call('XACK', KEYS[3], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[3], ARGV[2])
end
return delivered
"""

# Set the idle time of entries that this consumer still owns, without counting a delivery: idle 0 renews the lease
# of jobs being worked on, idle = visibility timeout hands failed jobs back for an immediate reclaim (and records
# the error for the dead-letter message). The owner check keeps a slow worker from stealing back, or blaming, a job
# another worker already reclaimed. KEYS: stream, then one error key per id. ARGV: group, consumer, idle ms,
# error ('' = none), error ttl, ids... Returns how many entries were touched.
TOUCH = """
local n = 0
for i = 6, #ARGV do
  if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2]) > 0 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'IDLE', ARGV[3], 'JUSTID')
    if ARGV[4] ~= '' then redis.call('SET', KEYS[i - 4], ARGV[4], 'EX', ARGV[5]) end
    n = n + 1
  end
end
return n
"""

# Remove a consumer from the group only if it holds nothing: DELCONSUMER drops its pending entries, which would
# strand those jobs for ever. KEYS: stream. ARGV: group, consumer.
PRUNE = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) > 0 then return 0 end
redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
return 1
"""

# Hand back the jobs of workers whose heartbeat lapsed, at once rather than after the visibility timeout: an entry
# held by a consumer without a heartbeat and untouched for the heartbeat TTL gets idle = visibility timeout (JUSTID:
# no delivery is counted), so the ordinary reclaim takes it over next, atomically and with attempts counted. The
# heartbeat check sits here, next to the change it guards, so a worker that is alive cannot be robbed: a live
# worker renews its heartbeat, and then its leases, every heartbeat interval. A consumer without a heartbeat that
# holds nothing and was silent for the TTL is removed from the group. KEYS: stream, then the heartbeat key of each
# consumer. ARGV: group, TTL ms, visibility ms, most entries per consumer, n, n consumer names, n consumer idle ms.
# Returns {entries handed back, ms until a holder could lapse next (-1 = none holds anything)}.
REAP = """
local group, ttl, visibility = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local limit, n = tonumber(ARGV[4]), tonumber(ARGV[5])
local handed, wake = 0, -1
local function soon(ms)
  if ms >= 0 and (wake < 0 or ms < wake) then wake = ms end
end
for i = 1, n do
  local name = ARGV[5 + i]
  local held = redis.call('XPENDING', KEYS[1], group, '-', '+', limit, name)
  local beat = redis.call('PTTL', KEYS[1 + i])
  if beat == -2 then
    for _, entry in ipairs(held) do
      local idle = tonumber(entry[3])
      if idle >= ttl then
        redis.call('XCLAIM', KEYS[1], group, name, 0, entry[1], 'IDLE', visibility, 'JUSTID')
        handed = handed + 1
      else
        soon(ttl - idle)
      end
    end
    if #held == 0 and tonumber(ARGV[5 + n + i]) >= ttl then
      redis.call('XGROUP', 'DELCONSUMER', KEYS[1], group, name)
    end
  elseif #held > 0 then
    soon(beat)
  end
end
return {handed, wake}
"""
