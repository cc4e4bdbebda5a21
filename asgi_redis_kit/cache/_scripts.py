"""The Lua scripts the Redis layer runs on a single server (on Cluster it sends
the same steps as single-key commands instead, see ``_redis_layer``).

Across processes, the leader takes a lease ``SET <lock> <token> NX PX <lease>``.
On a single Redis server the lookup script (``LOOKUP``) does this itself, in
the same atomic step that reads the entry and its versions, whenever the
entry key is absent (and the URL's vary record names the headers the key was
built for: otherwise the caller looks up another key): a cold miss pays no
extra round trip for its lease, and a hit never writes. Otherwise (an entry
that is stale or written under old versions, and always on Redis Cluster,
where the version keys live in other slots than the entry) ``ACQUIRE`` takes
it (on Cluster: the same SET NX and GET as single-key commands in one
pipeline), and returns the entry as it is at that moment, so a leader that
arrives just after another one stored the entry serves it instead of running
the handler again. Release is a compare-and-delete on the token (a lease that
expired and was taken by someone else is not ours to delete), done in the
same round trip that stores the entry, or as soon as the leader knows its
response will not be stored. A process that finds the lease held polls the
entry with backoff, and after ``lock_wait`` seconds (or when the lease
vanishes without an entry) runs the handler itself: a stuck leader slows
requests down, it never blocks them.
"""

from __future__ import annotations

# KEYS: entry, lease, vary record, the session's key when ARGV[3] is '1', then the
# version keys; ARGV: token ('' = only read), lease ms, '1' to prove a session, the
# vary record the key was built for ('' = none), '1' to append PTTLs. Returns the
# entry, the record, the versions, 1 (lease taken), -1 (entry absent, lease held by
# someone else) or 0 (entry present, no lease asked for, or the record names other
# headers: then the caller looks up another key and must not hold this one's
# lease), then 1 (the session exists, or none was asked about) or 0, then (ARGV[5])
# the PTTL of the entry, the record and each version key, read in the same atomic
# step so a near cache's copy never outlives the key (``cache._near_layer``). A
# per-user (vary_on_session) entry only counts while its session exists: a
# logged-out or revoked session's cookie must not get its cached pages, so the
# lookup proves it in the same step; a gone session takes no lease.
LOOKUP = """
local alive, first = 1, 4
if ARGV[3] == '1' then
  alive, first = redis.call('EXISTS', KEYS[4]), 5
end
local found = redis.call('MGET', KEYS[1], KEYS[3])
-- In slices: Lua's unpack() refuses more than ~8000 values (a route's many tags).
for i = first, #KEYS, 1000 do
  for _, value in ipairs(redis.call('MGET', unpack(KEYS, i, math.min(i + 999, #KEYS)))) do
    found[#found + 1] = value
  end
end
local leased = 0
if alive == 1 and not found[1] and ARGV[1] ~= '' and (found[2] or '') == ARGV[4] then
  if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
    leased = 1
  else
    leased = -1
  end
end
found[#found + 1] = leased
found[#found + 1] = alive
if ARGV[5] == '1' then
  found[#found + 1] = redis.call('PTTL', KEYS[1])
  found[#found + 1] = redis.call('PTTL', KEYS[3])
  for i = first, #KEYS do
    found[#found + 1] = redis.call('PTTL', KEYS[i])
  end
end
return found
"""

ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {1, redis.call('GET', KEYS[2])}
end
return {0, false}
"""

RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# Store the entry, name its learned headers in the vary record (ARGV[4], '' = none:
# the record is left as it is) and release our lease, in one round trip (the keys
# share a hash tag). The lease is the one the caller holds: the key it looked up,
# which names fewer headers than the entry's when the response taught it more.
STORE_AND_RELEASE = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if ARGV[4] ~= '' then
  redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[2])
end
if ARGV[3] ~= '' and redis.call('GET', KEYS[2]) == ARGV[3] then
  redis.call('DEL', KEYS[2])
end
return 1
"""
