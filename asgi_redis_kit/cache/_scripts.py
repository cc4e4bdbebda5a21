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
# the record is left as it is, unless ARGV[5] is '1': a data entry's record names
# exactly its tags, and none is no record) and release our lease, in one round trip
# (the keys share a hash tag). The lease is the one the caller holds: the key it
# looked up, which names fewer headers than the entry's when the response taught it
# more.
#
# A data entry (ARGV[5] '1') is stored only while the value's own version (KEYS[4])
# is still the one its refill read (ARGV[6]): a set() or delete() since bumped it,
# and storing then would overwrite the set's entry and record (a lost write). The
# lease is released either way.
STORE_AND_RELEASE = """
local current = ARGV[5] ~= '1' or
  tonumber(redis.call('GET', KEYS[4]) or '0') == tonumber(ARGV[6])
if current then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  if ARGV[4] ~= '' then
    redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[2])
  elseif ARGV[5] == '1' then
    redis.call('DEL', KEYS[3])
  end
end
if ARGV[3] ~= '' and redis.call('GET', KEYS[2]) == ARGV[3] then
  redis.call('DEL', KEYS[2])
end
return 1
"""

# The data cache (``_values``) writes entries in Lua, in the format of ``_entry``:
# b"ark1", the meta's length (4 bytes, big-endian), the meta (JSON whose last
# member is "v", the versions), the body. ``frame`` completes a meta head that
# Python encoded up to the versions. ``versions`` reads the version keys from KEYS[4]
# on (a single server) or takes them from ARGV from ``first`` on (Cluster, where they
# live in other slots and were read in a round trip before), with the value's own
# version ``own`` second, as ``CacheKey.version_keys`` orders them.
_VALUE_HELPERS = """
local function frame(head, versions, body)
  local meta = head .. ',"v":[' .. versions .. ']}'
  local n = #meta
  return 'ark1' .. string.char(math.floor(n / 16777216) % 256, math.floor(n / 65536) % 256,
    math.floor(n / 256) % 256, n % 256) .. meta .. body
end
local function number(raw)
  local n = tonumber(raw)
  if n == nil then return '0' end
  return string.format('%d', n)
end
local function versions(own, first)
  local found = {}
  if #KEYS > 3 then
    found[1] = number(redis.call('GET', KEYS[4]))
    found[2] = own
    for i = 5, #KEYS do found[#found + 1] = number(redis.call('GET', KEYS[i])) end
  else
    found[1] = number(ARGV[first])
    found[2] = own
    for i = first + 1, #ARGV do found[#found + 1] = number(ARGV[i]) end
  end
  return table.concat(found, ',')
end
"""

# ``Cache.set``. KEYS: entry, the value's version, its record, then (single server)
# the generation and tag version keys. ARGV: meta head, body, entry PX, record ('' =
# none), version PX, then (Cluster) the generation and tag versions. Bumps the
# value's version first, so a refill that read the old one never stores over this.
SET_VALUE = (
    _VALUE_HELPERS
    + """
local own = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('SET', KEYS[1], frame(ARGV[1], versions(number(own), 6), ARGV[2]), 'PX', ARGV[3])
if ARGV[4] == '' then
  redis.call('DEL', KEYS[3])
else
  redis.call('SET', KEYS[3], ARGV[4], 'PX', ARGV[3])
end
return 1
"""
)

# ``Cache.incr``: a counter is an entry whose meta says "e":"n" and whose body is the
# integer. KEYS, ARGV[1] (the head of a new counter), ARGV[3] and the versions as for
# SET_VALUE; ARGV[2] the amount, ARGV[4] the version PX. A counter still valid for
# the current versions is incremented in place and keeps its TTL; anything else
# under the key that is valid is not a counter (an error, nothing written); an
# invalid or absent one starts at the amount with the head's TTL and bumps the
# value's own version, as set() does. Returns {1, the new value}, {0, ''} (not a
# counter) or {2, ''} (Lua numbers are doubles: past 2^53 it would not be exact).
INCR_VALUE = (
    _VALUE_HELPERS
    + """
local current = versions(number(redis.call('GET', KEYS[2])), 5)
local suffix = ',"v":[' .. current .. ']}'
local raw = redis.call('GET', KEYS[1])
if raw and string.sub(raw, 1, 4) == 'ark1' and #raw >= 8 then
  local b1, b2, b3, b4 = string.byte(raw, 5, 8)
  local n = ((b1 * 256 + b2) * 256 + b3) * 256 + b4
  local meta = string.sub(raw, 9, 8 + n)
  if #meta > #suffix and string.sub(meta, -#suffix) == suffix then
    local body = string.sub(raw, 9 + n)
    if not string.find(meta, '"e":"n"', 1, true) or not string.match(body, '^%-?%d+$') then
      return {0, ''}
    end
    local value = tonumber(body) + tonumber(ARGV[2])
    if math.abs(value) >= 9007199254740992 then
      return {2, ''}
    end
    local left = redis.call('PTTL', KEYS[1])
    local text = string.format('%d', value)
    if left > 0 then
      redis.call('SET', KEYS[1], string.sub(raw, 1, 8 + n) .. text, 'PX', left)
    else
      redis.call('SET', KEYS[1], string.sub(raw, 1, 8 + n) .. text)
    end
    return {1, text}
  end
  -- A value set with tags under the current generation and own version: its tag
  -- versions live in other slots and are not read here, so it may still be valid;
  -- refuse rather than replace it (delete() it first).
  if string.find(meta, ',"v":[' .. current .. ',', 1, true) and
      not string.find(meta, '"e":"n"', 1, true) then
    return {0, ''}
  end
end
-- A new counter is a write like set(): bump the value's own version, so a refill
-- that read the key before never stores over it.
local own = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
current = versions(number(own), 5)
local text = string.format('%d', tonumber(ARGV[2]))
redis.call('SET', KEYS[1], frame(ARGV[1], current, text), 'PX', ARGV[3])
redis.call('DEL', KEYS[3])
return {1, text}
"""
)

# ``invalidate_tags``/``invalidate``/``clear``: bump one tag's or URL's version or
# a namespace's generation (KEYS[1]; ARGV[1]: its PX, 0 for none: a generation
# never expires). A version key expires (its PX outlives every entry written
# before the bump), and a generation can be evicted or deleted by hand; an INCR
# would then count 0 -> 1 again, the version an entry stored late in the key's
# last life was written under: that entry would be served again after this
# invalidation. So a key that is absent starts at Redis's clock in microseconds
# instead: later than any number it held before, which started at that clock too
# and grew by one per bump, and Redis runs bumps one at a time, each longer than
# a microsecond (lost and made again at once, a key still moves on). Numbers stay
# below 2**53, exact in Lua's doubles, until the year 2255.
BUMP = """
local version = redis.call('INCR', KEYS[1])
if version == 1 then
  local now = redis.call('TIME')
  version = tonumber(now[1]) * 1000000 + tonumber(now[2])
  redis.call('SET', KEYS[1], string.format('%d', version))
end
if ARGV[1] ~= '0' then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return version
"""

# ``Cache.delete``: bump the value's version (a refill that read it before never
# stores over the delete) and drop the entry and its record. KEYS: entry, version,
# record; ARGV: version PX. Returns 1 if the entry key existed.
DELETE_VALUE = """
redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3])
return redis.call('DEL', KEYS[1])
"""
