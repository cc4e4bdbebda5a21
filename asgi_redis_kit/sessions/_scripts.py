"""The Lua scripts of the session store: each reads and writes one key atomically.

Why scripts: saving an existing session must write only the fields this request
changed, and must do nothing at all if the session was cleared, revoked or expired
in the meantime -- a plain HSET would bring a logged-out session back to life when a
slow request finishes after the logout. The save script checks and writes in one
atomic step. Scripts run by EVALSHA; after a Redis restart empties the script
cache, the NOSCRIPT reply makes us load them and send again the commands it refused.

The fields the scripts read and write are described in ``_record``; the protocol
they take part in, in ``_store`` and ``_index``.
"""

from __future__ import annotations

import hashlib
from typing import Any

SAVED, GONE, EMPTIED, MOVED = 1, 0, 2, 3


class Script:
    # Lua's unpack() refuses more than ~8000 values ("too many results to
    # unpack"), so the scripts pass fields and ids to Redis in slices of 1000
    # (an even number: HSET takes field/value pairs).
    def __init__(self, text: str) -> None:
        # Every script may call bound_user(); Redis compiles it once per script.
        self.text = _BOUND_USER + text
        self.sha = hashlib.sha1(self.text.encode(), usedforsecurity=False).hexdigest()
        # As sent: redis-py's encoder returns bytes at its first check, a str or an
        # int only after several (twice per script call, on every request).
        self.sha_arg = self.sha.encode()


# The user bound to the live session record KEYS[1] ('' when it has none), or false
# when there is no such record: the key is missing, or holds something that is not
# one of our records (not a hash, or no creation time). Never an error reply.
_BOUND_USER = """
local function bound_user()
  if redis.call('TYPE', KEYS[1]).ok ~= 'hash'
      or redis.call('HEXISTS', KEYS[1], 'm:created') == 0 then
    return false
  end
  return redis.call('HGET', KEYS[1], 'm:user') or ''
end
"""

# ARGV: mode ('1' create: the key must not exist; '0' update: the key must be a live
# record still bound to the user ARGV[2], '' for none), TTL ms, n, then n field/value
# pairs, then fields to delete. Returns SAVED, GONE, EMPTIED or MOVED (bound to
# another user now: rebound or logged in by another request).
SAVE = Script("""
if ARGV[1] == '1' then
  if redis.call('EXISTS', KEYS[1]) == 1 then
    return 0
  end
else
  local user = bound_user()
  if user == false then
    return 0
  elseif user ~= ARGV[2] then
    return 3
  end
end
local last = 4 + 2 * tonumber(ARGV[4])
if last > 4 then
  for i = 5, last, 1000 do
    redis.call('HSET', KEYS[1], unpack(ARGV, i, math.min(i + 999, last)))
  end
end
if last < #ARGV then
  for i = last + 1, #ARGV, 1000 do
    redis.call('HDEL', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
  end
  -- An empty session is never stored: delete it once no data and no user is left.
  for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
    if string.sub(field, 1, 2) == 'd:' or field == 'm:user' then
      redis.call('PEXPIRE', KEYS[1], ARGV[3])
      return 1
    end
  end
  redis.call('DEL', KEYS[1])
  return 2
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
""")

# The whole record and its TTL in one command (nil when there is no record). A key
# that is not a hash (someone SET it) answers the string 'WRONGTYPE': a corrupt
# record, not an outage; any other error reply stays an error (a 503).
LOAD = Script("""
local fields = redis.pcall('HGETALL', KEYS[1])
if fields.err then
  if string.sub(tostring(fields.err), 1, 9) == 'WRONGTYPE' then
    return 'WRONGTYPE'
  end
  return fields
end
if #fields == 0 then
  return false
end
return {redis.call('PTTL', KEYS[1]), fields}
""")

# Counter on a live record still bound to the user ARGV[3] ('' for none); nil
# otherwise. Only the caller's own mistakes come back as a string (the value is not
# an integer, or the sum overflows 64 bits): every other error reply (OOM,
# READONLY, ...) is an outage and stays an error reply, so it becomes a 503.
INCR = Script("""
if bound_user() ~= ARGV[3] then
  return false
end
local result = redis.pcall('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
if type(result) == 'table' and result.err then
  local text = tostring(result.err)
  if text == 'ERR hash value is not an integer'
      or text == 'ERR increment or decrement would overflow'
      or text == 'ERR value is not an integer or out of range' then
    return text
  end
  return result
end
return result
""")

# The end of every script that adds to an index (KEYS[1]): it lives as long as
# the longest session it can hold (ARGV[1] ms; 0: no TTL).
_KEEP_INDEX = """
local ttl = tonumber(ARGV[1])
if ttl == 0 then
  redis.call('PERSIST', KEYS[1])
elseif redis.call('PTTL', KEYS[1]) < ttl then
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return 1
"""

# Add ids ARGV[2..] to the index; it lives as long as the longest session it can
# hold (ARGV[1]; 0: no TTL).
INDEX_ADD = Script(
    """
for i = 2, #ARGV, 1000 do
  redis.call('SADD', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
"""
    + _KEEP_INDEX
)

# The users whose index may list KEYS[1] (its notes and its bound user), for the
# un-index that follows its delete: only then is an SREM of it always safe.
_NOTED = """
local function noted_users()
  local users = {}
  for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
    if string.sub(field, 1, 4) == 'm:i:' then
      users[#users + 1] = string.sub(field, 5)
    end
  end
  users[#users + 1] = redis.call('HGET', KEYS[1], 'm:user') or nil
  return users
end
"""

# Make the index live at least ARGV[1] ms more; one without a TTL keeps none.
INDEX_TTL = Script("""
local pttl = redis.call('PTTL', KEYS[1])
if pttl >= 0 and pttl < tonumber(ARGV[1]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return 1
""")

# Delete the session only if it is still a live record bound to ARGV[1] ('' for
# none). {1, noted users...}: deleted; 0: no live record; 2: live but bound to
# someone else.
DELETE_IF_USER = Script(
    _NOTED
    + """
local user = bound_user()
if user == false then
  return 0
elseif user == ARGV[1] then
  local users = noted_users()
  redis.call('DEL', KEYS[1])
  table.insert(users, 1, 1)
  return users
end
return 2
"""
)

# Delete the key whatever it holds; the noted users of the record it was.
KILL = Script(
    _NOTED
    + """
if bound_user() == false then
  redis.call('DEL', KEYS[1])
  return {}
end
local users = noted_users()
redis.call('DEL', KEYS[1])
return users
"""
)

# Note the user ARGV[1] on a live record (a bind that lost its race left an index
# entry there); 0 when the record is dead, and the entry can go.
NOTE_USER = Script("""
if bound_user() == false then
  return 0
end
redis.call('HSET', KEYS[1], 'm:i:' .. ARGV[1], '1')
return 1
""")

# {bound user ('' for none), m:prev, m:root ('' for none)}, or nil when there is
# no live record: the links revoke_session follows.
LINK = Script("""
local user = bound_user()
if user == false then
  return false
end
return {user, redis.call('HGET', KEYS[1], 'm:prev') or '',
        redis.call('HGET', KEYS[1], 'm:root') or ''}
""")

# One entry of user_sessions(): nil when there is no live record.
INFO = Script("""
local user = bound_user()
if user == false then
  return false
end
return {redis.call('HGET', KEYS[1], 'm:created'), user, redis.call('PTTL', KEYS[1])}
""")

# Revocation markers live in the index itself (the one key certain to share its
# slot, whatever the user id). A live marker makes INDEX_SUCCESSOR refuse.
_MARKERS = """
local function now_ms()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end
local function marker_live(member, now)
  local deadline = tonumber(string.match(member, '^!r:(%d+):'))
  return deadline ~= nil and deadline > now
end
"""

# ARGV: grace ms, token. Take the whole index atomically (so a login racing a revoke
# stays indexed) and leave in its place a marker (returned first) that refuses every
# successor of a taken session until revoke_user removes it. Other revokes' live
# markers stay.
TAKE_INDEX = Script(
    _MARKERS
    + """
local now = now_ms()
local marker = '!r:' .. (now + tonumber(ARGV[1])) .. ':' .. ARGV[2]
local pttl = redis.call('PTTL', KEYS[1])
local members = redis.call('SMEMBERS', KEYS[1])
redis.call('DEL', KEYS[1])
local taken = {marker}
for _, member in ipairs(members) do
  if string.sub(member, 1, 1) ~= '!' then
    taken[#taken + 1] = member
  elseif marker_live(member, now) then
    redis.call('SADD', KEYS[1], member)
  end
end
redis.call('SADD', KEYS[1], marker)
-- The index keeps its TTL (no TTL: none), so entries put back outlive their sessions.
if pttl ~= -1 then
  redis.call('PEXPIRE', KEYS[1], math.max(pttl, tonumber(ARGV[1])))
end
return taken
"""
)

# ARGV: grace ms, token. The index (marker first), with a marker added, for
# revoke_session; nil, and no marker, when the index is empty.
MARK_INDEX = Script(
    _MARKERS
    + """
local members = redis.call('SMEMBERS', KEYS[1])
if #members == 0 then
  return false
end
local marker = '!r:' .. (now_ms() + tonumber(ARGV[1])) .. ':' .. ARGV[2]
redis.call('SADD', KEYS[1], marker)
table.insert(members, 1, marker)
return members
"""
)

# Index ARGV[2], a successor (a record continuing a session bound to this user),
# unless a revoke of the user is under way: 0, refused. TTL as INDEX_ADD.
INDEX_SUCCESSOR = Script(
    _MARKERS
    + """
local now = now_ms()
for _, member in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if string.sub(member, 1, 1) == '!' then
    if marker_live(member, now) then
      return 0
    end
    redis.call('SREM', KEYS[1], member)
  end
end
redis.call('SADD', KEYS[1], ARGV[2])
"""
    + _KEEP_INDEX
)

SCRIPTS = (
    LOAD,
    SAVE,
    INCR,
    INDEX_ADD,
    INDEX_TTL,
    DELETE_IF_USER,
    KILL,
    NOTE_USER,
    LINK,
    INFO,
    TAKE_INDEX,
    MARK_INDEX,
    INDEX_SUCCESSOR,
)


Command = tuple[Any, ...]  # ("HGETALL", key): redis-py parses each reply by its name


def script(script: Script, key: str, *args: Any) -> Command:
    return ("EVALSHA", script.sha_arg, b"1", key, *args)


# The metrics name of each script's round trip ("session_load"...).
_OPERATIONS = {
    each.sha_arg: f"session_{name.lower()}"
    for name, each in list(globals().items())
    if isinstance(each, Script)
}


def operation_of(command: Command) -> str:
    """The operation a round trip is counted under: its first command's script
    (``session_save``) or Redis command (``session_pexpire``); never a key."""
    name = command[0]
    if name == "EVALSHA":
        return _OPERATIONS.get(command[1], "session_script")
    return f"session_{str(name).lower()}"
