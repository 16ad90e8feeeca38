"""The queue's Lua scripts: the atomic executors of every transition between its lists,
the one atomic read of all of them (``SNAPSHOT_LISTS``, for reconcile) and the release of
the janitor's cluster lock. No Lua lives outside this module.

Each script first removes the payload from the list it expects it in and acts only if it
was there, so two parties racing over one job can never both act. The decisions the
scripts take (``_RECOVER``: requeue or dead-letter a dead worker's job) follow
:func:`stagerd.recovery.decide`; ``tests/queue/test_recovery_lua.py`` proves they agree.
Dead-letter records come from :func:`stagerd.queue.dlq.dead_letter_record`: ``_MOVE`` stores
one built in Python, ``_RECOVER`` fills in a template built by it.
"""

from __future__ import annotations

# KEYS: processing, target list, attempts hash, phase hash
# ARGV: raw payload, "front"|"back"|"dead"|"ack", batch id ("" if unknown),
#       dead-letter record (for dead), "1" to refund the attempt (a hand-back that was not
#       a failure)
MOVE = """
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 0 then return 0 end
if ARGV[5] == '1' and ARGV[3] ~= '' then redis.call('HINCRBY', KEYS[3], ARGV[3], -1) end
if ARGV[2] == 'front' then redis.call('LPUSH', KEYS[2], ARGV[1])
elseif ARGV[2] == 'back' then redis.call('RPUSH', KEYS[2], ARGV[1])
elseif ARGV[2] == 'dead' then redis.call('RPUSH', KEYS[2], ARGV[4]) end
if ARGV[3] ~= '' then
  redis.call('HDEL', KEYS[4], ARGV[3])
  if ARGV[2] ~= 'front' and ARGV[2] ~= 'back' then redis.call('HDEL', KEYS[3], ARGV[3]) end
end
return 1
"""

# KEYS: processing, pending, dead, attempts, heartbeat, workers, phase
# ARGV: max_attempts, worker id, dead-letter record template (JSON, every field present),
#       record id base (the n-th dead letter of this pass gets id '%012x' % (base + n))
# Returns {requeued batch ids..., '|', dead-lettered batch ids...}
# The rule is stagerd.recovery.decide with the owner dead and no failure reported: a job
# whose attempts are used up is dead-lettered, any other (also one without a batch id,
# whose attempts are never counted) goes back to the head of pending, order kept.
RECOVER = """
if redis.call('EXISTS', KEYS[5]) == 1 then return {'|'} end
local requeued, dead = {}, {}
local base = tonumber(ARGV[4])
local n = 0
while true do
  local raw = redis.call('RPOP', KEYS[1])
  if not raw then break end
  n = n + 1
  local ok, job = pcall(cjson.decode, raw)
  local batch = ''
  if ok and type(job) == 'table' and type(job['batch_id']) == 'string' then batch = job['batch_id'] end
  local attempts = 0
  if batch ~= '' then attempts = tonumber(redis.call('HGET', KEYS[4], batch) or '0') end
  if batch ~= '' and attempts >= tonumber(ARGV[1]) then
    local record = cjson.decode(ARGV[3])
    record['id'] = string.format('%012x', base + n)
    record['payload'] = raw
    record['batch_id'] = batch
    record['error'] = 'worker ' .. ARGV[2] .. ' died (heartbeat expired) on attempt ' .. attempts
    record['attempts'] = attempts
    redis.call('RPUSH', KEYS[3], cjson.encode(record))
    redis.call('HDEL', KEYS[4], batch)
    table.insert(dead, batch)
  else
    redis.call('LPUSH', KEYS[2], raw)
    table.insert(requeued, batch)
  end
end
redis.call('DEL', KEYS[7])
redis.call('SREM', KEYS[6], ARGV[2])
local out = requeued
table.insert(out, '|')
for _, b in ipairs(dead) do table.insert(out, b) end
return out
"""

# KEYS: heartbeat, workers. ARGV: worker id, token, ttl ms
# Returns {was a member of the workers set (0/1), the token the heartbeat key held or ''}
BEAT = """
local member = redis.call('SISMEMBER', KEYS[2], ARGV[1])
local before = redis.call('GET', KEYS[1]) or ''
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('SADD', KEYS[2], ARGV[1])
return {member, before}
"""

# KEYS: epoch. ARGV: floor. Raise the lease epoch to at least *floor* (Redis forgot it).
EPOCH_FLOOR = """
local now = tonumber(redis.call('GET', KEYS[1]) or '0')
if now < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) return tonumber(ARGV[1]) end
return now
"""

# KEYS: pending, enqueued marker hash. ARGV: batch id, marker, payload, force
ENQUEUE_ONCE = """
if ARGV[4] ~= '1' and redis.call('HGET', KEYS[2], ARGV[1]) == ARGV[2] then return 0 end
redis.call('RPUSH', KEYS[1], ARGV[3])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
return 1
"""

# KEYS: the lists to read (pending, dead). ARGV: the processing lists' SCAN pattern.
# Every payload in every list, read in one script: a job moving between two lists (a
# pickup, a requeue) is seen exactly once. Keys of another type matching the pattern
# are skipped.
SNAPSHOT_LISTS = """
local out = {}
for _, key in ipairs(KEYS) do
  for _, raw in ipairs(redis.call('LRANGE', key, 0, -1)) do table.insert(out, raw) end
end
local cursor = '0'
repeat
  local page = redis.call('SCAN', cursor, 'MATCH', ARGV[1], 'COUNT', 1000)
  cursor = page[1]
  for _, key in ipairs(page[2]) do
    if redis.call('TYPE', key)['ok'] == 'list' then
      for _, raw in ipairs(redis.call('LRANGE', key, 0, -1)) do table.insert(out, raw) end
    end
  end
until cursor == '0'
return out
"""

# KEYS: the lock key. ARGV: the holder's token.
# Compare-and-delete: a holder whose lock expired and was taken by another must not
# delete the new holder's key.
RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
