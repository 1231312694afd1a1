"""
State shared by replicas, in Redis (`state_url=redis://...`; see `core.state`).

- Tables (`RedisTable`): one key per entry, `mcp-bastion:<table>:<sha256 of the key>` (session ids and
  request states are bearer secrets: Redis never holds them in the clear), expiring after `idle_ttl`
  without use; a claim is one Lua script, so two replicas cannot both take a key.
- Approvals (`RedisStore`): one JSON document per approval; every change of status is a
  WATCH/MULTI transaction, so an approval is decided once and `use` lets exactly one replica run an
  approved call. Each change is published on a channel: a replica whose client waits on a call is woken
  by its subscription when a reviewer decides on any replica, without polling. A held call names the
  replica holding it; every replica keeps a heartbeat key alive, so a decision for a call whose replica
  died cancels it instead (the call is gone with that replica's client connection).
- Pins (`RedisPinStore`): one hash of pins and a version number, changed by compare-and-set.
- Unreachable (refused, timed out, loading, read-only, out of memory): every operation raises
  `core.state.Unavailable`, so what needs shared state is refused and nothing is decided from a stale
  copy. After a failure, calls fail at once for `RETRY_AFTER` seconds, then the next one tries again:
  a dead Redis costs a caller one timeout per interval, not one per request.

Redis bounds: entries expire, but the number kept is bounded by Redis's own `maxmemory` (with the
`volatile-lru` policy every key here has a TTL), not by the gateway's `max_items`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, WatchError
from redis.retry import Retry

from mcp_bastion.core.approvals import (
    APPROVED,
    CANCELLED,
    DENIED,
    EXPIRED,
    LOCAL_OPERATOR,
    MAX_PENDING,
    PENDING,
    USED,
    Approval,
    Grant,
    Person,
    Refused,
    Store,
    check_decision,
    from_record,
    to_record,
)
from mcp_bastion.core.audit import iso_time
from mcp_bastion.core.pins import CHANGED_NOW, NEW, Pin, PinStore, pin_from_record
from mcp_bastion.core.state import DEFAULT_MAX, Backend, Table, Unavailable

logger = logging.getLogger("mcp_bastion")

PREFIX = "mcp-bastion:"
TIMEOUT = 0.5  # seconds a Redis operation may take before the state counts as unreachable
RETRY_AFTER = 1.0  # seconds after a failure before the next operation tries Redis again
KEEP_DECIDED = 24 * 3600  # seconds a decided approval stays listed after it expires
HEARTBEAT_EVERY = 2.0
HEARTBEAT_TTL = 6.0  # a replica whose heartbeat is this old is gone
SCHEMES = ("redis", "rediss", "unix")
_APPROVAL_ID = re.compile(r"apr-[0-9a-f]{12}")

_CLAIM = """
local v = redis.call('GET', KEYS[1])
if (not v) or v == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return ARGV[1]
end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return v
"""
_DROP_IF = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def shown(url: str) -> str:
    """The URL without its password, for logs and the readiness probe."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


def check_url(url: str) -> None:
    """Raise ValueError unless `url` is a Redis URL the client accepts."""
    scheme = urlsplit(url).scheme
    if scheme not in SCHEMES:
        raise ValueError(f"state_url must be redis://, rediss:// or unix:// (got {shown(url)!r})")
    try:
        redis.connection.parse_url(url)
    except ValueError as e:
        raise ValueError(f"state_url {shown(url)!r}: {e}") from None


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _hashed(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


class RedisBackend(Backend):
    kind = "redis"
    shared = True

    def __init__(self, url: str, replica: str, *, password: str | None = None, timeout: float = TIMEOUT,
                 retry_after: float = RETRY_AFTER, prefix: str = PREFIX, clock: Callable[[], float] = time.time):
        check_url(url)
        self.url, self.replica, self.prefix = url, replica, prefix
        self.timeout, self.retry_after, self._clock = timeout, retry_after, clock
        self._password = password
        # One quick retry covers a pooled connection that died with a restarted Redis (not a timeout: the
        # client runs on the event loop, so a slow Redis must cost one timeout, not two); no backoff.
        self.client = redis.Redis.from_url(url, password=password, socket_timeout=timeout,
                                           socket_connect_timeout=timeout, decode_responses=True,
                                           retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
                                           client_name=f"mcp-bastion-{replica}"[:60])
        self._lock = threading.Lock()
        self._down: str | None = None  # why the last operation failed, while it stands
        self._next_try = 0.0
        self._tasks: list[asyncio.Task] = []
        self._stores: list[RedisStore] = []
        self._claim = self.client.register_script(_CLAIM)
        self._drop_if = self.client.register_script(_DROP_IF)

    # --- every operation goes through here ---------------------------------------------------

    def call(self, op: Callable[[], Any]) -> Any:
        """Run one Redis operation; any failure is `Unavailable` (and fails the next ones at once for a while)."""
        now = time.monotonic()
        if self._down is not None and now < self._next_try:
            raise Unavailable(f"shared state unreachable: {self._down}")
        try:
            out = op()
        except WatchError:
            raise
        except (RedisError, OSError) as e:
            why = f"{shown(self.url)}: {type(e).__name__}: {e}"[:300]
            with self._lock:
                if self._down is None:
                    logger.error("mcp-bastion: shared state unreachable (%s); what needs it is refused", why)
                self._down, self._next_try = why, time.monotonic() + self.retry_after
            raise Unavailable(f"shared state unreachable: {why}") from e
        if self._down is not None:
            with self._lock:
                if self._down is not None:
                    logger.warning("mcp-bastion: shared state reachable again (%s)", shown(self.url))
                self._down = None
        return out

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def status(self) -> tuple[bool, str]:
        try:
            self.call(self.client.ping)
        except Unavailable as e:
            return False, str(e)
        return True, f"redis {shown(self.url)} (replica {self.replica})"

    # --- what it keeps ---------------------------------------------------------------------------

    def table(self, name: str, *, idle_ttl: float, max_items: int = DEFAULT_MAX) -> Table:
        return RedisTable(self, name, idle_ttl)

    def pins(self) -> PinStore:
        return RedisPinStore(self)

    def approvals(self, on_change: Callable[[Approval, str], None] | None = None) -> Store:
        store = RedisStore(self, on_change)
        self._stores.append(store)
        return store

    # --- this replica's heartbeat, and the subscription that wakes waiting calls -------------------

    def beat(self) -> None:
        self.call(lambda: self.client.set(self.key("replica", self.replica), str(self._clock()),
                                          px=int(HEARTBEAT_TTL * 1000)))

    def alive(self, replica: str) -> bool:
        if replica == self.replica:
            return True
        return bool(self.call(lambda: self.client.exists(self.key("replica", replica))))

    def start(self) -> None:
        """In the event loop (the State addon's `running`): the heartbeat and the approvals subscription."""
        loop = asyncio.get_running_loop()
        with contextlib.suppress(Exception):
            if self.client.exists(self.key("replica", self.replica)):
                logger.warning("mcp-bastion: another gateway calls itself replica %r (or this one restarted within "
                               "%.0f s): replica ids must be unique, or each cancels the other's held calls",
                               self.replica, HEARTBEAT_TTL)
        self._tasks.append(loop.create_task(self._heartbeat()))
        for store in self._stores:
            store.listen()

    async def _heartbeat(self) -> None:
        while True:
            with contextlib.suppress(Unavailable):
                self.beat()
            await asyncio.sleep(HEARTBEAT_EVERY)

    def async_client(self) -> redis.asyncio.Redis:
        # No read timeout: a subscription waits for messages; keepalive and health checks find a dead peer.
        return redis.asyncio.Redis.from_url(self.url, password=self._password, socket_connect_timeout=self.timeout,
                                            socket_keepalive=True, health_check_interval=10, decode_responses=True)

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()
        for store in self._stores:
            store.stop()
        with contextlib.suppress(Exception):
            self.client.delete(self.key("replica", self.replica))
        with contextlib.suppress(Exception):
            self.client.close()


class RedisTable(Table):
    def __init__(self, backend: RedisBackend, name: str, idle_ttl: float):
        self.b, self.name, self.idle_ttl = backend, name, idle_ttl
        self._ms = max(1, int(idle_ttl * 1000))

    def _key(self, key: str) -> str:
        return self.b.key(self.name, _hashed(key))

    def claim(self, key: str, value: str) -> str:
        return self.b.call(lambda: self.b._claim(keys=[self._key(key)], args=[value, self._ms]))

    def get(self, key: str) -> str | None:
        return self.b.call(lambda: self.b.client.getex(self._key(key), px=self._ms))

    def put(self, key: str, value: str) -> None:
        self.b.call(lambda: self.b.client.set(self._key(key), value, px=self._ms))

    def drop(self, key: str, value: str | None = None) -> None:
        if value is None:
            self.b.call(lambda: self.b.client.delete(self._key(key)))
        else:
            self.b.call(lambda: self.b._drop_if(keys=[self._key(key)], args=[value]))

    def __len__(self) -> int:
        pattern = self.b.key(self.name, "*")
        return self.b.call(lambda: sum(1 for _ in self.b.client.scan_iter(match=pattern, count=1000)))


class RedisStore(Store):
    """Approvals shared by replicas (see the module's note)."""

    def __init__(self, backend: RedisBackend, on_change: Callable[[Approval, str], None] | None = None):
        self.b = backend
        self.on_change = on_change
        self._waiters: dict[str, asyncio.Event] = {}
        self._listener: asyncio.Task | None = None
        self.channel = backend.key("approvals", "changed")

    # --- keys ---

    def _k(self, approval_id: str) -> str:
        return self.b.key("approval", approval_id)

    def _ids(self) -> str:
        return self.b.key("approvals", "all")

    def _pending(self) -> str:
        return self.b.key("approvals", "pending")

    def _bound(self, binding_: str) -> str:
        return self.b.key("approvals", "binding", binding_)

    def _grant(self, who: tuple[str | None, str | None], rule: str, tool: str | None) -> str:
        return self.b.key("grant", _hashed(_dumps([who[0], who[1], rule, tool])))

    def _ttl_ms(self, a: Approval) -> int:
        return max(1000, int((a.expires + KEEP_DECIDED - self.b._clock()) * 1000))

    # --- reading ---

    def _read(self, approval_id: str) -> Approval | None:
        if not _APPROVAL_ID.fullmatch(approval_id):
            return None  # only ids this gateway makes name a key (a path segment is the caller's)
        raw = self.b.call(lambda: self.b.client.get(self._k(approval_id)))
        return from_record(json.loads(raw)) if raw else None

    def _read_many(self, ids: list[str]) -> list[Approval]:
        if not ids:
            return []
        raws = self.b.call(lambda: self.b.client.mget([self._k(i) for i in ids]))
        return [from_record(json.loads(r)) for r in raws if r]

    def _due(self, a: Approval | None) -> Approval | None:
        """`a`, expired in the store first if its time is up (whoever reads it first records that, once)."""
        if a is not None and a.status == PENDING and self.b._clock() >= a.expires:
            a, _ = self._transition(a.id, _expire)
        return a

    def get(self, approval_id: str) -> Approval | None:
        return self._due(self._read(approval_id))

    def all(self) -> list[Approval]:
        ids = self.b.call(lambda: self.b.client.zrange(self._ids(), 0, -1))
        items = self._read_many(ids)
        gone = set(ids) - {a.id for a in items}
        if gone:  # forgotten (KEEP_DECIDED passed): drop them from the index
            self.b.call(lambda: self.b.client.zrem(self._ids(), *gone))
        return [x for x in (self._due(a) for a in items) if x is not None]

    def pending(self) -> Iterable[Approval]:
        return [a for a in self.all() if a.status == PENDING]

    def _of_binding(self, binding_: str) -> list[Approval]:
        ids = self.b.call(lambda: self.b.client.smembers(self._bound(binding_)))
        return sorted(self._read_many(sorted(ids)), key=lambda a: a.created)

    def approved_for(self, binding_: str) -> Approval | None:
        return next((a for a in self._of_binding(binding_) if a.status == APPROVED), None)

    def pending_for(self, binding_: str) -> Approval | None:
        return next((a for a in map(self._due, self._of_binding(binding_)) if a is not None and a.status == PENDING),
                    None)

    def grant_for(self, who: Person, rule: str, tool: str | None) -> Grant | None:
        raw = self.b.call(lambda: self.b.client.get(self._grant(who.key, rule, tool)))
        if not raw:
            return None
        data = json.loads(raw)
        return Grant(who.key, rule, tool, data["until"], data["approval"])

    # --- changing ---

    def create(self, approval: Approval) -> Approval:
        now = self.b._clock()

        def count() -> int:
            self.b.client.zremrangebyscore(self._pending(), "-inf", now)
            return self.b.client.zcard(self._pending())

        if self.b.call(count) >= MAX_PENDING:
            raise Refused("too many calls are waiting for approval")
        approval.events.append({"at": iso_time(now), "event": "requested"})
        ttl = self._ttl_ms(approval)

        def write() -> None:
            p = self.b.client.pipeline(transaction=True)
            p.set(self._k(approval.id), _dumps(to_record(approval)), px=ttl, nx=True)
            p.zadd(self._ids(), {approval.id: approval.created})
            p.zremrangebyrank(self._ids(), 0, -(MAX_PENDING + 1))  # listed: the newest, as many as may wait
            p.zadd(self._pending(), {approval.id: approval.expires})
            p.sadd(self._bound(approval.binding), approval.id)
            p.pexpire(self._bound(approval.binding), ttl)
            p.publish(self.channel, approval.id)
            if not p.execute()[0]:
                raise Refused(f"approval id {approval.id} is taken")

        self.b.call(write)
        if self.on_change is not None:
            self.on_change(approval, "requested")
        return approval

    def _transition(self, approval_id: str,
                    change: Callable[[Approval], tuple[str, Callable[[Any], None] | None] | None]
                    ) -> tuple[Approval | None, bool]:
        """Apply `change` atomically: it sees the stored approval (changing it in place) and returns
        (event, extra writes) or None for no change; it may raise `Refused`. (approval, whether it changed)."""
        if not _APPROVAL_ID.fullmatch(approval_id):
            return None, False
        key = self._k(approval_id)

        def attempt() -> tuple[Approval | None, str | None]:
            with self.b.client.pipeline(transaction=True) as p:
                p.watch(key)
                raw = p.get(key)
                if not raw:
                    p.unwatch()
                    return None, None
                a = from_record(json.loads(raw))
                what = change(a)
                if what is None:
                    p.unwatch()
                    return a, None
                event, extra = what
                a.events.append({"at": iso_time(self.b._clock()), "event": event})
                p.multi()
                p.set(key, _dumps(to_record(a)), px=self._ttl_ms(a))
                if a.status != PENDING:
                    p.zrem(self._pending(), a.id)
                if extra is not None:
                    extra(p)
                p.publish(self.channel, a.id)
                p.execute()
                return a, event

        for _ in range(20):
            try:
                a, event = self.b.call(attempt)
            except WatchError:
                continue  # another replica changed it meanwhile: look again
            if event is not None and self.on_change is not None:
                self.on_change(a, event)
            return a, event is not None
        raise Unavailable("shared state: an approval kept changing under this replica")

    def decide(self, approval_id: str, reviewer: Person, approve: bool, reason: str | None) -> Approval:
        gone: list[str] = []

        def change(a: Approval):
            if a.status == PENDING and self.b._clock() >= a.expires:
                a.status = EXPIRED
                return EXPIRED, None
            check_decision(a, approval_id, reviewer, approve, reason)
            if a.waiting and a.holder and not self.b.alive(a.holder):
                # Its client waited on a replica that is gone: nothing would run it. Cancelled, said so.
                gone.append(a.holder)
                a.status, a.decided_at = CANCELLED, self.b._clock()
                a.decision_reason = f"the gateway replica {a.holder} holding the call stopped; it was not forwarded"
                return "cancelled", None
            now = self.b._clock()
            a.status = APPROVED if approve else DENIED
            a.decided_by, a.decision_reason, a.decided_at = reviewer, (reason or "").strip() or None, now
            extra = None
            if approve and a.spec.grant:
                grant = _dumps({"approval": a.id, "until": now + a.spec.grant})
                key, ms = self._grant(a.requester.key, a.rule, a.tool), int(a.spec.grant * 1000)
                extra = lambda p: p.set(key, grant, px=ms)  # noqa: E731
            return ("approved" if approve else "denied"), extra

        a, _ = self._transition(approval_id, change)
        if a is None:
            raise Refused(f"no approval request {approval_id}")
        if gone:
            raise Refused(f"{a.id} was cancelled: {a.decision_reason}")
        if a.status == EXPIRED:
            raise Refused(f"{a.id} expired at {iso_time(a.expires)}")
        return a

    def decide_locally(self, approval_id: str, approve: bool, reason: str) -> Approval | None:
        def change(a: Approval):
            if a.status != PENDING:
                return None
            a.status = APPROVED if approve else DENIED
            a.decided_by, a.decision_reason, a.decided_at = LOCAL_OPERATOR, reason, self.b._clock()
            return ("approved" if approve else "denied"), None

        return self._transition(approval_id, change)[0]

    def cancel(self, approval_id: str, why: str) -> None:
        def change(a: Approval):
            if a.status != PENDING:
                return None
            a.status, a.decision_reason, a.decided_at = CANCELLED, why, self.b._clock()
            return "cancelled", None

        self._transition(approval_id, change)

    def use(self, approval_id: str) -> bool:
        def change(a: Approval):
            if a.status != APPROVED:
                return None
            a.status = USED
            return "used", None

        return self._transition(approval_id, change)[1]

    # --- waiting, woken by the subscription ---

    async def wait(self, approval_id: str, timeout: float) -> Approval:
        """Until decided or expired. While Redis is unreachable the call keeps waiting (nobody can decide
        meanwhile) and is refused at its deadline; a request that vanished from the store is refused."""
        event = self._waiters.setdefault(approval_id, asyncio.Event())
        self.listen()
        last: Approval | None = None
        deadline = self.b._clock() + timeout
        try:
            while True:
                event.clear()
                try:
                    a = self.get(approval_id)
                    reachable = True
                except Unavailable:
                    a, reachable = None, False
                if reachable and a is None:
                    return _ended(last, approval_id, CANCELLED, "the request is gone from the shared state")
                if a is not None:
                    if a.status != PENDING:
                        return a
                    last, deadline = a, min(deadline, a.expires)
                left = deadline - self.b._clock()
                if left <= 0:
                    if reachable:
                        a, _ = self._transition(approval_id, _expire)
                        if a is not None:
                            return a
                    return _ended(last, approval_id, EXPIRED, "not decided in time (the shared state was unreachable)")
                # Woken by the subscription (or its reconnection); unreachable, look again every second.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), left if reachable else min(left, RETRY_AFTER))
        finally:
            self._waiters.pop(approval_id, None)

    def listen(self) -> None:
        if self._listener is None or self._listener.done():
            with contextlib.suppress(RuntimeError):  # no running loop: `wait` starts it
                self._listener = asyncio.get_running_loop().create_task(self._listen())

    def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            self._listener = None

    def _wake_all(self) -> None:
        for event in self._waiters.values():
            event.set()

    async def _listen(self) -> None:
        while True:
            client = self.b.async_client()
            try:
                async with client.pubsub() as ps:
                    await ps.subscribe(self.channel)
                    self._wake_all()  # what changed while this replica was not subscribed is read again
                    async for message in ps.listen():
                        if message.get("type") == "message":
                            event = self._waiters.get(message.get("data"))
                            if event is not None:
                                event.set()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # RedisError, OSError: subscribe again shortly
                logger.warning("mcp-bastion: approvals subscription lost (%s: %s); subscribing again",
                               type(e).__name__, e)
                self._wake_all()
                await asyncio.sleep(RETRY_AFTER)
            finally:
                with contextlib.suppress(Exception):
                    await client.aclose()


def _expire(a: Approval) -> tuple[str, None] | None:
    if a.status != PENDING:
        return None
    a.status = EXPIRED
    return "expired", None


def _ended(last: Approval | None, approval_id: str, status: str, why: str) -> Approval:
    """What a waiting call is told when the store cannot say: a local copy ended (never a decision to run)."""
    if last is None:
        raise Unavailable(f"approval {approval_id}: {why}")
    last.status, last.decision_reason, last.decided_at = status, why, time.time()
    return last


_PIN_WRITE = """
local v = redis.call('GET', KEYS[1]) or '0'
if v ~= ARGV[1] then return false end
if ARGV[3] == '' then redis.call('HDEL', KEYS[2], ARGV[2]) else redis.call('HSET', KEYS[2], ARGV[2], ARGV[3]) end
return redis.call('INCR', KEYS[1])
"""


class RedisPinStore(PinStore):
    """Tool, prompt and template pins shared by replicas: one Redis hash of pins and a version number.

    Each check first asks for the version (one round trip) and reads the hash again only when another
    replica changed it. A change (a new pin, a changed definition seen, an accept, a forget) is written
    only if the version is still the one this replica read (a Lua compare-and-set); otherwise it reads the
    pins again and looks once more, so two replicas that first see a tool at once pin it once.
    """

    def __init__(self, backend: RedisBackend):
        super().__init__(None)
        self.b = backend
        self._version: str | None = None  # of the pins held here; None: read them before the next use
        self._write_script = backend.client.register_script(_PIN_WRITE)
        self._vkey, self._hkey = backend.key("pins", "version"), backend.key("pins", "all")

    def refresh(self) -> None:
        version = self.b.call(lambda: self.b.client.get(self._vkey)) or "0"
        if version == self._version:
            return

        def read() -> tuple[str | None, dict[str, str]]:
            p = self.b.client.pipeline(transaction=True)
            p.get(self._vkey)
            p.hgetall(self._hkey)
            got = p.execute()
            return got[0], got[1]

        version, raw = self.b.call(read)
        if self._version is not None and int(version or 0) < int(self._version):
            # The counter only grows: a smaller one means Redis lost what it held (restarted without its
            # append-only file, flushed). Every definition will be pinned afresh on first sight.
            logger.error("mcp-bastion: the shared pins went back from version %s to %s: Redis lost them; "
                         "definitions are pinned afresh as they are next listed (check Redis's persistence)",
                         self._version, version or 0)
        pins = []
        for field, value in raw.items():
            try:
                pins.append(pin_from_record(json.loads(value)))
            except (ValueError, KeyError, TypeError) as e:
                raise Unavailable(f"shared pin {field[:80]} is unreadable: {e}") from None
        with self._lock:
            self._replace_all(pins)
            self._version = version or "0"

    def _write(self, pin: Pin, gone: bool = False) -> bool:
        field = _dumps(list(pin.key))
        value = "" if gone else _dumps(asdict(pin))
        out = self.b.call(lambda: self._write_script(keys=[self._vkey, self._hkey],
                                                     args=[self._version or "0", field, value]))
        if out is None:
            self._version = None  # another replica wrote first: read again
            return False
        self._version = str(out)
        return True

    def _again(self, attempt: Callable[[], Any], written: Callable[[Any], tuple[Pin, bool] | None]) -> Any:
        for _ in range(8):
            self.refresh()
            out = attempt()
            change = written(out)
            if change is None or self._write(*change):
                return out
        raise Unavailable("shared pins kept changing under this replica")

    def observe(self, upstream, kind, item, findings=(), now=None):
        return self._again(lambda: super(RedisPinStore, self).observe(upstream, kind, item, findings, now),
                           lambda out: (out[1], False) if out[0] in (NEW, CHANGED_NOW) and out[1] is not None
                           else None)

    def _fresh(self, pins: list[Pin]) -> list[Pin]:
        return [self._pins[p.key] for p in pins if p.key in self._pins]

    def accept(self, pins, by, now=None, expect=None):
        return self._again(lambda: super(RedisPinStore, self).accept(self._fresh(pins), by, now, expect),
                           lambda pin: (pin, False))

    def forget(self, pins):
        return self._again(lambda: super(RedisPinStore, self).forget(self._fresh(pins)), lambda pin: (pin, True))
