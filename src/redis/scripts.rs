//! The Lua scripts: one per operation, each atomic on the server. A record is a hash:
//!
//! Invariant: each operation is one script, atomic on the server; on a cluster every key a
//! script touches is in one slot (checked before it is sent), and so is its notification
//! channel, which the script names from its record's key (`CHANNEL`).
//!
//! The channel is not passed as a key. Redis counts every declared key of a script in a slot
//! that is being migrated, and refuses (`TRYAGAIN`) a script with more than one key when some
//! are not on the node; a channel is never a key on any node. Declared, it made every
//! completion, release and removal in a migrating slot fail until the migration ended.
//!
//! | field | meaning |
//! |---|---|
//! | `k` | kind: `i` in flight, `ip` in flight from a pending request, `c` completed, `p` pending, `v` value |
//! | `t` | fencing token (`i`, `ip`) or version (`v`) |
//! | `d` | lease deadline, ms (`i`, `ip`) |
//! | `f` | request fingerprint, 16 bytes (`i`, `ip`, `c`) |
//! | `r` | response (`c`), payload (`p`, `ip`) or value (`v`) |
//! | `ca`, `ea` | completed at / expires at, ms (`c`, `p`; `ea` of a value, 0 = never) |
//! | `w` | set (`1`) once a `begin` has found the lease held (`i`): someone may be waiting, so the completion or release publishes; without it they publish nothing |
//!
//! A completed record is written over its lease's fields, so it may keep the lease's `t`,
//! `d` and `w`; nothing reads them in a completed record.
//!
//! Time is the server's (`TIME`), so replicas with skewed clocks agree; or, with
//! `client_clock(max_skew)`, the caller's, with leases taken over only once past by more than
//! the skew (`TIME` costs more than any other call a script makes). Tokens and versions
//! are `max(previous + 1, server time in µs)`: strictly increasing per key even across a
//! delete or an expiry, and exact in Lua's doubles (below 2^53 until the year 2255).
//! Every record has a `PEXPIREAT` at the moment the embedded store would consider it dead,
//! so Redis enforces the TTLs. Completion and release publish on the key's channel (`<key>`
//! prefixed by the notify prefix) when a waiter may exist (`w`), removal always.

/// The clock, from the server: `now` (ms), `us` (µs), and `late`, the time a lease must be
/// past to count as expired (here `now` itself).
const SERVER_TIME: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local us = tonumber(t[1]) * 1000000 + tonumber(t[2])
local late = now
"#;

/// The clock, from the caller (`RedisStoreBuilder::client_clock`): the last three ARGV are
/// its ms, its µs and the bound on clock skew (ms). A lease counts as expired only once it is
/// past by more than the skew, so a caller whose clock runs ahead (by at most the bound)
/// never takes over a lease its holder still has by its own clock.
const CLIENT_TIME: &str = r#"
local now = tonumber(ARGV[#ARGV - 2])
local us = tonumber(ARGV[#ARGV - 1])
local late = now - tonumber(ARGV[#ARGV])
"#;

/// Common prelude: the record's notification channel, and token helpers.
const PRELUDE: &str = r#"
local CHANNEL = '@CHANNEL_PREFIX@' .. KEYS[1]
-- Numbers passed to redis.call are printed with %.17g by Redis's Lua: integers below 2^53
-- (tokens, millisecond times) are written exactly.
local function next_token(prev)
  local p = tonumber(prev) or 0
  if p + 1 > us then return p + 1 end
  return us
end
"#;

/// KEYS: record. ARGV: fingerprint, lease ms, retention ms.
/// Returns {1, token, deadline, takeover} | {0, deadline} | {2, response, ca, ea} | {3} | {-1, kind}
pub(crate) const BEGIN: &str = r#"
local h = redis.call('HMGET', KEYS[1], 'k', 't', 'd', 'f', 'r', 'ca', 'ea')
local fp, lease, ret = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local function acquire(prev, takeover)
  local tok = next_token(prev)
  local d = now + lease
  -- An in-flight record has exactly these fields: no DEL needed, fresh or taken over.
  redis.call('HSET', KEYS[1], 'k', 'i', 't', tok, 'd', d, 'f', fp)
  redis.call('PEXPIREAT', KEYS[1], d + ret)
  return {1, tok, d, takeover}
end
local k = h[1]
if not k then return acquire(nil, 0) end
if k == 'c' then
  if h[4] ~= fp then return {3} end
  return {2, h[5], tonumber(h[6]), tonumber(h[7])}
end
if k == 'i' then
  if h[4] ~= fp then return {3} end
  if tonumber(h[3]) > late then
    -- Someone may wait for this holder: its completion or release must publish.
    redis.call('HSET', KEYS[1], 'w', 1)
    return {0, tonumber(h[3])}
  end
  return acquire(h[2], 1)
end
return {-1, k}
"#;

/// KEYS: record, then each write's key. ARGV: token, response, ttl ms, then per
/// write: op (`a` put if absent, `s` set if version, `d` delete if version), version, value,
/// ttl ms (0: none). Returns {1, expires_at} | {-2} stale | {-3, index, current or -1} |
/// {-4, index, kind}
pub(crate) const COMPLETE: &str = r#"
local h = redis.call('HMGET', KEYS[1], 'k', 't', 'f', 'w')
if (h[1] ~= 'i' and h[1] ~= 'ip') or tonumber(h[2]) ~= tonumber(ARGV[1]) then return {-2} end
local n = #KEYS - 1
local current = {}
for i = 1, n do
  local w = redis.call('HMGET', KEYS[i + 1], 'k', 't')
  local cur = nil
  if w[1] then
    if w[1] ~= 'v' then return {-4, i - 1, w[1]} end
    cur = tonumber(w[2])
  end
  local base = 4 + (i - 1) * 4
  local op, ver = ARGV[base], tonumber(ARGV[base + 1])
  if op == 'a' then
    if cur ~= nil then return {-3, i - 1, cur} end
  elseif cur ~= ver then
    return {-3, i - 1, cur or -1}
  end
  current[i] = cur
end
local ea = now + tonumber(ARGV[3])
local fp = h[3]
-- Over the lease's fields (its `t`, `d` and `w` stay, unread in a completed record): no DEL.
redis.call('HSET', KEYS[1], 'k', 'c', 'r', ARGV[2], 'f', fp, 'ca', now, 'ea', ea)
redis.call('PEXPIREAT', KEYS[1], ea)
for i = 1, n do
  local base = 4 + (i - 1) * 4
  local op, ttl = ARGV[base], tonumber(ARGV[base + 3])
  local key = KEYS[i + 1]
  if op == 'd' then
    redis.call('DEL', key)
  else
    local ver = next_token(current[i])
    local wea = 0
    if ttl > 0 then wea = now + ttl end
    redis.call('DEL', key)
    redis.call('HSET', key, 'k', 'v', 't', ver, 'r', ARGV[base + 2], 'ea', wea)
    if wea > 0 then redis.call('PEXPIREAT', key, wea) end
  end
end
if h[4] then redis.call('PUBLISH', CHANNEL, '1') end
return {1, ea}
"#;

/// KEYS: record. ARGV: token, pending ttl ms. Returns 1 | -2 stale.
pub(crate) const RELEASE: &str = r#"
local h = redis.call('HMGET', KEYS[1], 'k', 't', 'w')
if (h[1] ~= 'i' and h[1] ~= 'ip') or tonumber(h[2]) ~= tonumber(ARGV[1]) then return -2 end
if h[1] == 'ip' then
  local ea = now + tonumber(ARGV[2])
  redis.call('HSET', KEYS[1], 'k', 'p', 'ca', now, 'ea', ea)
  redis.call('HDEL', KEYS[1], 'd', 'f')
  redis.call('PEXPIREAT', KEYS[1], ea)
else
  redis.call('DEL', KEYS[1])
end
if h[3] then redis.call('PUBLISH', CHANNEL, '1') end
return 1
"#;

/// KEYS: record. ARGV: token, extend ms, retention ms. Returns the new deadline | -2 stale.
pub(crate) const RENEW: &str = r#"
local h = redis.call('HMGET', KEYS[1], 'k', 't')
if (h[1] ~= 'i' and h[1] ~= 'ip') or tonumber(h[2]) ~= tonumber(ARGV[1]) then return -2 end
local d = now + tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'd', d)
redis.call('PEXPIREAT', KEYS[1], d + tonumber(ARGV[3]))
return d
"#;

/// KEYS: record. Returns 1 if something was removed.
pub(crate) const REMOVE: &str = r#"
local n = redis.call('DEL', KEYS[1])
if n > 0 then redis.call('PUBLISH', CHANNEL, '1') end
return n
"#;

/// KEYS: record. ARGV: op, version, value, ttl ms. Returns {1, version or -1} | {0, current
/// or -1} | {-1, kind}
pub(crate) const CAS: &str = r#"
local w = redis.call('HMGET', KEYS[1], 'k', 't')
local cur = nil
if w[1] then
  if w[1] ~= 'v' then return {-1, w[1]} end
  cur = tonumber(w[2])
end
local op, ver, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[4])
if op == 'a' then
  if cur ~= nil then return {0, cur} end
elseif cur ~= ver then
  return {0, cur or -1}
end
if op == 'd' then
  redis.call('DEL', KEYS[1])
  return {1, -1}
end
local nv = next_token(cur)
local ea = 0
if ttl > 0 then ea = now + ttl end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'k', 'v', 't', nv, 'r', ARGV[3], 'ea', ea)
if ea > 0 then redis.call('PEXPIREAT', KEYS[1], ea) end
return {1, nv}
"#;

/// KEYS: record. ARGV: payload, ttl ms. Returns {1} stored | {2, deadline} | {3} completed |
/// {-1, kind}
pub(crate) const PUT_PENDING: &str = r#"
local h = redis.call('HMGET', KEYS[1], 'k', 'd')
local k = h[1]
if not k or k == 'p' then
  local ea = now + tonumber(ARGV[2])
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'k', 'p', 'r', ARGV[1], 'ca', now, 'ea', ea)
  redis.call('PEXPIREAT', KEYS[1], ea)
  return {1}
end
if k == 'ip' then return {2, tonumber(h[2])} end
if k == 'c' then return {3} end
return {-1, k}
"#;

/// KEYS: record. ARGV: lease ms, retention ms, the empty fingerprint. Returns {0} not found |
/// {1, token, deadline, takeover, payload} | {2, deadline} | {3, response, ca, ea, fp} |
/// {-1, kind}
pub(crate) const TAKE_PENDING: &str = r#"
local h = redis.call('HMGET', KEYS[1], 'k', 't', 'd', 'r', 'ca', 'ea', 'f')
local k = h[1]
if not k then return {0} end
local function acquire(takeover)
  local tok = next_token(h[2])
  local d = now + tonumber(ARGV[1])
  redis.call('HSET', KEYS[1], 'k', 'ip', 't', tok, 'd', d, 'f', ARGV[3])
  redis.call('HDEL', KEYS[1], 'ca', 'ea')
  redis.call('PEXPIREAT', KEYS[1], d + tonumber(ARGV[2]))
  return {1, tok, d, takeover, h[4]}
end
if k == 'p' then return acquire(0) end
if k == 'ip' then
  if tonumber(h[3]) > late then return {2, tonumber(h[3])} end
  return acquire(1)
end
if k == 'c' then return {3, h[4], tonumber(h[5]), tonumber(h[6]), h[7]} end
return {-1, k}
"#;

/// The script with the prelude in front, publishing with `publish`: `PUBLISH` on one server,
/// `SPUBLISH` on a cluster (the channel is in the key's slot).
pub(crate) fn with_prelude(body: &str, publish: &str, client_clock: bool) -> String {
    let body = body.replace("redis.call('PUBLISH'", &format!("redis.call('{publish}'"));
    let prelude = PRELUDE.replace("@CHANNEL_PREFIX@", super::CHANNEL_PREFIX);
    let clock = if client_clock {
        CLIENT_TIME
    } else {
        SERVER_TIME
    };
    format!("{clock}{prelude}{body}")
}
