"""
The audit trail: one JSON record per MCP message and its decision, chained by HMAC.

Pure: no mitmproxy import. The AuditLog addon turns a finished flow into a
`FlowFacts` (plain data) and calls `build_records`; the forensics CLI calls the
same function on recorded flows, so a timeline and the audit log always agree.

Records and the chain
    Every record gets `seq` (1, 2, ...), `prev` (the previous record's `hash`,
    `GENESIS` for the first) and `hash` = HMAC-SHA256(key, canonical JSON of the
    record without `hash`). Editing a record breaks its own hash, deleting or
    reordering one breaks the next record's `prev` and `seq`. Deleting records
    at the end is caught by the head file written next to the log
    (`<log>.head`: the last `seq` and `hash`, itself MACed).

The head file
    Moved after every append, so it must be cheap: it is one fixed-size
    record (`HEAD_SIZE` bytes: canonical JSON padded with spaces) rewritten in
    place with a single `pwrite`, not a new file renamed over the old one. An
    update cut short by a crash or power loss leaves a head that does not
    parse or whose MAC fails: exactly what a forged head looks like. Whoever
    meets such a head cannot tell which it is, so it proves nothing about the
    end of the log: `verify_file` reports it, and the gateway, at start,
    verifies the whole log instead and, if the log is intact, continues it
    with a `recover` record that says the head could not vouch for the end
    (see `recovery_record`). What is lost in that case is only the detection
    of records deleted at the end *before* that restart; the recovery record
    keeps the event itself in the chain. A reader that meets a head being
    rewritten at that very moment reads it again (`read_valid_head`).

Which records
    One record per client-to-server message of a flow (a batch of three gives
    three records; a GET event stream or a DELETE gives one `kind: "http"`
    record), one per server-to-client *request* seen in a response (sampling,
    elicitation, roots), and one per server-to-client decision that concerns
    neither. Decisions about a client request's answer (masking the result,
    say) are folded into that request's record. `action` is the most severe of
    the record's decisions (error > deny > other > approve > mask > allow) or
    `forward` when no addon recorded a decision; `decisions` lists them all.
    Transport failures (stage `transport`) are not decisions: they are in `error`.
"""

from __future__ import annotations

import csv
import hmac
import json
import math
import os
import re
import secrets
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson

from .message import SUMMARY_KEYS
from .vocab import Meta

GENESIS = "0" * 64
MIN_KEY_BYTES = 16

# flow.metadata keys (mirrors flowstate; repeated here because core imports nothing from the addons)

_SEVERITY = {"error": 0, "deny": 1, "approve": 3, "mask": 4, "allow": 5}
_OTHER = 2  # actions this module does not know (e.g. "hold") rank between deny and approve
_DECISION_FIELDS = ("stage", "direction", "action", "rule", "reason", "code", "profile", "profiles", "masked")


class AuditError(ValueError):
    """A key, log or head file that cannot be used."""


# --- building records ---------------------------------------------------------


@dataclass
class FlowFacts:
    """What the audit needs to know about one finished (or abandoned) exchange."""

    flow_id: str
    started: float  # epoch seconds when the request arrived
    http_method: str
    metadata: dict[str, Any]
    session: str | None = None
    status: int | None = None  # HTTP status the client received
    error: str | None = None  # transport error, or "incomplete: ..." at shutdown
    latency_ms: float | None = None


_iso_second: tuple[int, str] = (-1, "")  # the last whole second formatted, and its text


def iso_time(epoch: float) -> str:
    """`2025-01-31T12:00:00.123Z` (the same text as datetime's isoformat, with each second formatted once)."""
    global _iso_second
    if not 0 <= epoch < 253402300800:  # before 1970 or after 9999: datetime's own way
        return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    frac, whole = math.modf(epoch)
    us = round(frac * 1e6)  # as datetime.fromtimestamp rounds (half to even), carrying into the second
    if us >= 1_000_000:
        whole, us = whole + 1, us - 1_000_000
    second = int(whole)
    if _iso_second[0] != second:
        _iso_second = (second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
    return f"{_iso_second[1]}.{us // 1000:03d}Z"


def parse_iso(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _rank(decision: dict[str, Any]) -> int:
    return _SEVERITY.get(decision.get("action", ""), _OTHER)


# A message summary keeps its target under SUMMARY_KEYS[kind]; an audit record names it by kind.
_RECORD_KEYS = {key: str(kind) for kind, key in SUMMARY_KEYS.items()}


def _target_fields(summary: dict[str, Any]) -> dict[str, Any]:
    return {_RECORD_KEYS[key]: summary[key] for key in _RECORD_KEYS if summary.get(key) is not None}


def _groups(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [g for g in value if isinstance(g, str)] if isinstance(value, (list, tuple)) else []


def _is_flow_level(d: dict[str, Any]) -> bool:
    return "id" not in d and "method" not in d


def _concerns(d: dict[str, Any], msg: dict[str, Any], ref: str, kept: dict[str, dict[str, Any]]) -> bool:
    """Whether decision `d` (not flow-level) is about client message `msg` (kept at `ref`) or its answer.

    A decision made through the message pipeline names its message (`ref`, e.g.
    "request/0", "events/3"; `kept` maps refs to the flow's summaries): the
    client's message itself, or an answer (result or error) carrying its id.
    Decisions without a ref (recordings made before refs existed) are linked
    by request id and method.
    """
    if "ref" in d:
        if d["ref"] == ref:
            return True
        answer = kept.get(d["ref"])
        return (answer is not None and answer.get("kind") in ("response", "error") and msg.get("kind") == "request"
                and "id" in msg and answer.get("id") == msg["id"])
    direction = d.get("direction", "client_to_server")
    if "id" in msg:
        if d.get("id") != msg["id"]:
            return False
        if direction == "client_to_server":
            return True
        return d.get("method") in (None, msg.get("method"))
    # GET/DELETE are summarised as kind "http"; the policy decides them as the pseudo-method "http:GET".
    methods = (msg.get("method"), f"http:{msg.get('method')}") if msg.get("kind") == "http" else (msg.get("method"),)
    return direction == "client_to_server" and "id" not in d and d.get("method") in methods


def _withheld_answer(d: dict[str, Any]) -> bool:
    """A decision that kept the upstream's answer from the client (it got an error in its place)."""
    return (d.get("direction") == "server_to_client" and d.get("kind") in ("response", "error")
            and d.get("action") in ("deny", "approve", "error", "drop"))


def _verdict(decisions: list[dict[str, Any]]) -> dict[str, Any]:
    if not decisions:
        return {"action": "forward"}
    # The most severe decision; among equals, one a rule made (its stage and reason are the story).
    worst = min(decisions, key=lambda d: (_rank(d), d.get("rule") is None))
    out = {"action": worst.get("action", "forward")}
    rule = worst.get("rule") or next((d["rule"] for d in decisions if d.get("rule")), None)
    for key, value in (("rule", rule), ("stage", worst.get("stage")), ("reason", worst.get("reason"))):
        if value is not None:
            out[key] = value
    out["decisions"] = [{k: d[k] for k in _DECISION_FIELDS if d.get(k) is not None} for d in decisions]
    return out


def build_records(facts: FlowFacts) -> list[dict[str, Any]]:
    """The audit records of one flow, in message order (without seq/prev/hash)."""
    meta = facts.metadata
    state = meta.get(Meta.MCP) if isinstance(meta.get(Meta.MCP), dict) else {}
    ident = meta.get(Meta.IDENTITY) if isinstance(meta.get(Meta.IDENTITY), dict) else {}
    # A transport failure (client gone, upstream unreachable) is not an enforcement decision:
    # it shows in `error` (from the flow), not in `action`.
    decisions = [d for d in meta.get(Meta.DECISIONS) or () if isinstance(d, dict) and d.get("stage") != "transport"]

    base: dict[str, Any] = {
        "time": iso_time(facts.started),
        "flow": facts.flow_id,
        "session": facts.session,
        "subject": ident.get("sub"),
        "groups": _groups(ident.get("groups")),
        "upstream": meta.get(Meta.UPSTREAM),
    }
    if ident.get("client_id"):
        base["client_id"] = ident["client_id"]
    tail: dict[str, Any] = {"latency_ms": facts.latency_ms, "status": facts.status}
    if facts.error:
        tail["error"] = facts.error
    if meta.get(Meta.MASK) is not None:
        tail["masking"] = meta[Meta.MASK]
    if meta.get(Meta.APPROVAL) is not None:
        tail["approval"] = meta[Meta.APPROVAL]
    if meta.get(Meta.PINS):
        tail["pins"] = meta[Meta.PINS]  # definitions this listing hid or flagged: "tool weather changed"

    replies = [s for s in (state.get("response") or []) + (state.get("events") or []) if isinstance(s, dict)]
    answers = {s["id"]: ("result" if s["kind"] == "response" else "error")
               for s in replies if s.get("kind") in ("response", "error") and "id" in s}
    flow_level = [d for d in decisions if _is_flow_level(d)]
    specific = [d for d in decisions if not _is_flow_level(d)]
    used: set[int] = set()

    requests = [s for s in state.get("request") or () if isinstance(s, dict)]
    if not requests:
        requests = [{"kind": "http", "method": facts.http_method}]
    records = []
    kept = {f"response/{i}": x for i, x in enumerate(state.get("response") or []) if isinstance(x, dict)}
    kept.update((f"events/{i}", x) for i, x in enumerate(state.get("events") or []) if isinstance(x, dict))
    for i, msg in enumerate(requests):
        mine = [d for d in specific if id(d) not in used and _concerns(d, msg, f"request/{i}", kept)]
        used.update(id(d) for d in mine)
        rec = dict(base, direction="client_to_server", kind=msg.get("kind"), method=msg.get("method"))
        if "id" in msg:
            rec["id"] = msg["id"]
            rec["rpc"] = answers.get(msg["id"])
            if any(_withheld_answer(d) for d in mine):
                rec["rpc"] = "error"  # the upstream's answer was refused: the client got an error instead
        rec.update(_target_fields(msg))
        rec.update(_verdict(flow_level + mine))
        rec.update(tail)
        records.append(rec)

    for ref, msg in kept.items():
        if msg.get("kind") != "request":
            continue
        mine = [d for d in specific if id(d) not in used and (
            d.get("ref") == ref if "ref" in d else
            d.get("direction") == "server_to_client" and d.get("id") == msg.get("id")
            and d.get("method") in (None, msg.get("method")))]
        used.update(id(d) for d in mine)
        rec = dict(base, direction="server_to_client", kind="request", method=msg.get("method"), id=msg.get("id"))
        rec.update(_target_fields(msg))
        rec.update(_verdict(mine))
        rec.update(tail)
        records.append(rec)

    for d in specific:
        if id(d) in used:
            continue
        rec = dict(base, direction=d.get("direction", "client_to_server"), kind="message", method=d.get("method"))
        if "id" in d:
            rec["id"] = d["id"]
        if d.get("target") is not None:
            rec["target"] = d["target"]
        rec.update(_verdict([d]))
        rec.update(tail)
        records.append(rec)
    return records


MAX_LISTED = 32  # messages (or flows) a begin or incomplete record lists by name; the rest are counted


def forward_record(facts: FlowFacts) -> dict[str, Any]:
    """The record written *before* a request is forwarded: what is about to reach the upstream.

    `kind: "forward"`, one per forwarded flow, naming its messages (at most
    `MAX_LISTED`, then a count). The flow's ordinary records follow when it
    ends; a `forward` record with none after it is a call the gateway
    forwarded and never saw end (killed): `open_flows` finds them at restart.
    """
    meta = facts.metadata
    state = meta.get(Meta.MCP) if isinstance(meta.get(Meta.MCP), dict) else {}
    ident = meta.get(Meta.IDENTITY) if isinstance(meta.get(Meta.IDENTITY), dict) else {}
    requests = [s for s in state.get("request") or () if isinstance(s, dict)]
    listed = []
    for msg in requests[:MAX_LISTED]:
        item = {k: msg[k] for k in ("kind", "method", "id") if msg.get(k) is not None}
        item.update(_target_fields(msg))
        listed.append(item)
    rec: dict[str, Any] = {
        "time": iso_time(facts.started),
        "flow": facts.flow_id,
        "session": facts.session,
        "subject": ident.get("sub"),
        "groups": _groups(ident.get("groups")),
        "upstream": meta.get(Meta.UPSTREAM),
        "direction": "client_to_server",
        "kind": "forward",
        "method": requests[0].get("method") if len(requests) == 1 else facts.http_method,
        "action": "forward",
        "stage": "audit",
        "messages": listed or [{"kind": "http", "method": facts.http_method}],
    }
    if len(requests) > MAX_LISTED:
        rec["more_messages"] = len(requests) - MAX_LISTED
    if ident.get("client_id"):
        rec["client_id"] = ident["client_id"]
    return rec


def lifecycle_record(action: str, reason: str, flows: list[str] | None = None) -> dict[str, Any]:
    """A record about the gateway itself: `start`, `stop`, or `incomplete` (calls a dead gateway left)."""
    rec: dict[str, Any] = {"time": iso_time(time.time()), "kind": "audit", "stage": "audit", "action": action,
                           "reason": reason, "pid": os.getpid()}
    if flows is not None:
        rec["flows"] = flows[:MAX_LISTED * 32]
        if len(flows) > len(rec["flows"]):
            rec["more_flows"] = len(flows) - len(rec["flows"])
    return rec


def open_flows(path: str | os.PathLike, block: int = 1024 * 1024) -> list[str]:
    """Flows of the last run that were forwarded (a `forward` record) and never ended, oldest first.

    Read from the end of the log back to the last `start` record: a log
    whose last record is a `stop` (the gateway ended cleanly) costs one
    read. Each ordinary record of a flow, and the `incomplete` records of a
    clean stop, end it.
    """
    ended: set[str] = set()
    opened: list[str] = []
    for line in _lines_backwards(path, block):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict):
            continue
        kind, action = rec.get("kind"), rec.get("action")
        if kind == "audit" and action in ("start", "stop"):
            break
        flow = rec.get("flow")
        if kind == "forward" and isinstance(flow, str):
            if flow not in ended:
                opened.append(flow)
        elif isinstance(flow, str):
            ended.add(flow)
    return opened[::-1]


def _lines_backwards(path: str | os.PathLike, block: int) -> Iterator[bytes]:
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return
    with f:
        f.seek(0, os.SEEK_END)
        pos = f.tell()
        rest = b""
        while pos > 0:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            chunk = f.read(step) + rest
            lines = chunk.split(b"\n")
            rest = lines[0]
            for line in reversed(lines[1:]):
                if line.strip():
                    yield line
        if rest.strip():
            yield rest


# --- the chain ----------------------------------------------------------------


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def canonical(record: dict[str, Any]) -> bytes:
    """Sorted keys, compact, UTF-8, spelled by Python's json (pin and approval digests: stable for good)."""
    return _CANONICAL.encode(record).encode("utf-8")


def chain_bytes(record: dict[str, Any]) -> bytes:
    """The bytes a record's (or the head's) MAC covers: sorted keys, compact, UTF-8.

    Spelled by orjson, about ten times faster than `canonical`; the two differ only
    in how they write a float below 1e-4 (`0.00001` / `1e-05`) and NaN. A value orjson
    cannot write (an integer beyond 64 bits, a key that is not a string) takes
    `canonical`. A verifier accepts either spelling (`record_mac_matches`), so logs
    written before orjson was used verify as they did.
    """
    try:
        return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # orjson.JSONEncodeError is one
        return canonical(record)


def record_mac(key: bytes, record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "hash"} if "hash" in record else record
    return hmac.digest(key, chain_bytes(body), "sha256").hex()


def record_mac_matches(key: bytes, record: dict[str, Any]) -> bool:
    """Whether `record["hash"]` is its MAC, over either spelling of its canonical JSON (see `chain_bytes`)."""
    claimed = record.get("hash")
    if not isinstance(claimed, str):
        return False
    if hmac.compare_digest(record_mac(key, record), claimed):
        return True
    body = {k: v for k, v in record.items() if k != "hash"}
    return hmac.compare_digest(hmac.digest(key, canonical(body), "sha256").hex(), claimed)


class Chain:
    """Seals records one after another: `seq`, `prev`, `hash`."""

    def __init__(self, key: bytes, seq: int = 0, prev: str = GENESIS):
        self.key = key
        self.seq = seq
        self.prev = prev

    def seal(self, record: dict[str, Any]) -> dict[str, Any]:
        out = dict(record, seq=self.seq + 1, prev=self.prev)
        out["hash"] = record_mac(self.key, out)
        self.seq, self.prev = out["seq"], out["hash"]
        return out


_LINE_ORDER = ("seq", "time", "session", "subject", "groups", "client_id", "upstream", "direction", "kind",
               "method", "id", "tool", "resource", "prompt", "task", "target", "action", "rule", "stage", "reason")


def line_of(record: dict[str, Any]) -> bytes:
    """One log line: the fields people read first, `prev` and `hash` last (the MAC is over `chain_bytes`)."""
    ordered = {k: record[k] for k in _LINE_ORDER if k in record}
    ordered.update((k, v) for k, v in record.items() if k not in ordered and k not in ("prev", "hash"))
    ordered.update((k, record[k]) for k in ("prev", "hash") if k in record)
    try:
        return orjson.dumps(ordered, option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:
        return _COMPACT.encode(ordered).encode("utf-8") + b"\n"


def head_path(log: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(log)}.head")


HEAD_SIZE = 256  # bytes of the head file: canonical JSON, spaces, newline


def make_head(key: bytes, seq: int, last_hash: str) -> dict[str, Any]:
    head = {"seq": seq, "hash": last_hash, "time": iso_time(time.time())}
    head["mac"] = hmac.digest(key, b"head|" + chain_bytes(head), "sha256").hex()
    return head


def check_head(key: bytes, head: dict[str, Any]) -> bool:
    """Whether the head's MAC verifies, over either spelling of its canonical JSON (see `chain_bytes`)."""
    if not isinstance(head.get("mac"), str):
        return False
    body = {k: v for k, v in head.items() if k != "mac"}
    return any(hmac.compare_digest(hmac.digest(key, b"head|" + spelled(body), "sha256").hex(), head["mac"])
               for spelled in (chain_bytes, canonical))


def read_head(log: str | os.PathLike) -> dict[str, Any] | None:
    path = head_path(log)
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise AuditError(f"unreadable head file {path}: {e}") from None
    if not isinstance(data, dict):
        raise AuditError(f"unreadable head file {path}")
    return data


def read_valid_head(log: str | os.PathLike, key: bytes, retry_after: float = 0.05) -> dict[str, Any] | None:
    """The head file if it verifies; else it is read once more (the gateway may have been
    rewriting it at that moment) and returned as found: check it with `check_head`.

    Raises AuditError if it cannot be parsed twice.
    """
    try:
        head = read_head(log)
        if head is None or check_head(key, head):
            return head
    except AuditError:
        pass
    time.sleep(retry_after)
    return read_head(log)


class HeadFile:
    """The head file, kept open and rewritten in place: one `pwrite` of `HEAD_SIZE` bytes per update."""

    def __init__(self, log: str | os.PathLike):
        self.path = head_path(log)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        self._trim = os.fstat(self.fd).st_size > HEAD_SIZE  # not one of ours: cut what follows our record

    def write(self, head: dict[str, Any]) -> None:
        data = chain_bytes(head)
        if len(data) >= HEAD_SIZE:
            raise AuditError(f"head record of {len(data)} bytes does not fit in {HEAD_SIZE}")
        data = data.ljust(HEAD_SIZE - 1) + b"\n"
        if os.pwrite(self.fd, data, 0) != HEAD_SIZE:
            raise OSError(f"short write to {self.path}")
        if self._trim:
            os.ftruncate(self.fd, HEAD_SIZE)
            self._trim = False

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> HeadFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def recovery_record(reason: str, seq: int) -> dict[str, Any]:
    """The record a gateway appends when it continues a log whose head could not vouch for its end.

    `reason` says why (no head file, or one that does not parse or verify);
    the log itself was verified up to `seq` before this record is written.
    """
    return {
        "time": iso_time(time.time()),
        "kind": "audit",
        "stage": "audit",
        "action": "recover",
        "reason": f"{reason}; the log verified from its first record to seq {seq} and continues from there, "
                  "but records removed from its end before this point could not have been detected",
    }


def last_line(path: str | os.PathLike, block: int = 64 * 1024) -> bytes | None:
    """The last line of a file (with its newline if it has one), read from the end."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        end = f.tell()
        if end == 0:
            return None
        buf = b""
        pos = end
        while pos > 0:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            buf = f.read(step) + buf
            cut = buf.rfind(b"\n", 0, len(buf) - 1)
            if cut >= 0:
                return buf[cut + 1 :]
        return buf


def resume_point(path: str | os.PathLike) -> tuple[int, str]:
    """(seq, hash) of the last record of an existing log, to continue its chain."""
    try:
        tail = last_line(path)
    except FileNotFoundError:
        return 0, GENESIS
    if tail is None:
        return 0, GENESIS
    if not tail.endswith(b"\n"):
        raise AuditError(f"{path} ends with an incomplete record; run `scripts/audit verify {path}` before appending")
    try:
        rec = json.loads(tail)
        return int(rec["seq"]), str(rec["hash"])
    except (ValueError, KeyError, TypeError):
        raise AuditError(f"{path}: the last line is not an audit record; run `scripts/audit verify {path}`") from None


@dataclass
class Verdict:
    """The result of verifying a log: `ok`, or where the first bad record is and why."""

    ok: bool
    records: int
    last_seq: int = 0
    last_hash: str = GENESIS
    bad_line: int | None = None
    bad_seq: int | None = None
    reason: str | None = None
    notes: list[str] = field(default_factory=list)
    hashes_at: dict[int, str] = field(default_factory=dict)


def verify_lines(lines: Iterable[bytes], key: bytes, *, prev: str = GENESIS, seq: int = 0,
                 remember: Iterable[int] = ()) -> Verdict:
    """Check every record's MAC, `seq` and `prev`; stop at the first bad one.

    `prev`/`seq` give the chain position the log is expected to start from
    (the genesis for a complete log). The hashes of the records whose seq is
    in `remember` are returned in `hashes_at`.
    """
    wanted = set(remember)
    seen: dict[int, str] = {}
    count = 0
    for lineno, raw in enumerate(lines, 1):
        # bind this iteration's chain position now (bad() is only ever called within it)
        def bad(reason: str, rec_seq: Any = None, *, count: int = count, seq: int = seq, prev: str = prev,
                lineno: int = lineno) -> Verdict:
            return Verdict(False, count, seq, prev, lineno, rec_seq, reason, hashes_at=seen)

        if not raw.endswith(b"\n"):
            return bad("incomplete last line (no newline): the record was cut off")
        try:
            rec = json.loads(raw)
        except ValueError:
            return bad("not valid JSON")
        if not isinstance(rec, dict) or not isinstance(rec.get("hash"), str):
            return bad("not an audit record")
        rec_seq = rec.get("seq")
        if not record_mac_matches(key, rec):
            return bad("hash mismatch: the record was modified (or the key is wrong)", rec_seq)
        if rec.get("prev") != prev:
            return bad("chain broken: prev is not the previous record's hash "
                       "(a record was removed, inserted or reordered)", rec_seq)
        if rec_seq != seq + 1:
            return bad(f"sequence gap: expected seq {seq + 1}, found {rec_seq}", rec_seq)
        seq, prev = rec_seq, rec["hash"]
        if seq in wanted:
            seen[seq] = prev
        count += 1
    return Verdict(True, count, seq, prev, hashes_at=seen)


def verify_file(path: str | os.PathLike, key: bytes, *, require_head: bool = True) -> Verdict:
    """Verify a log file and its head file (which catches records deleted at the end).

    The head is written right after the records, so after a crash it may lag
    behind the log: records after the head are reported in `notes`, not as
    tampering. A head *ahead* of the log, or not matching the record it
    names, means records were removed or replaced. A head that does not
    verify is reported as such: it may have been forged, made with another
    key, or cut short by a crash while it was being rewritten (the gateway
    then verifies the log itself when it starts, see the module docstring).
    """
    head = read_valid_head(path, key)
    if head is not None and not check_head(key, head):
        return Verdict(False, 0, reason="head file does not verify (modified, made with another key, "
                                        "or cut short by a crash while being rewritten)")
    head_seq = head.get("seq") if head else None
    with open(path, "rb") as f:
        verdict = verify_lines(f, key, remember=[head_seq] if isinstance(head_seq, int) else [])
    if not verdict.ok:
        return verdict
    if head is None:
        if require_head:
            verdict.ok = False
            verdict.reason = f"no head file {head_path(path)}: cannot prove that no records were removed at the end"
        else:
            verdict.notes.append("no head file: records removed at the end would go unnoticed")
        return verdict
    if not isinstance(head_seq, int) or head_seq > verdict.last_seq:
        verdict.ok = False
        verdict.bad_seq = verdict.last_seq + 1
        verdict.reason = (f"records were removed at the end: the log ends at seq {verdict.last_seq}, "
                          f"the head file records seq {head_seq}")
    elif head_seq and verdict.hashes_at.get(head_seq) != head.get("hash"):
        verdict.ok = False
        verdict.bad_seq = head_seq
        verdict.reason = f"record seq {head_seq} is not the one the head file records: the log was replaced"
    elif head_seq < verdict.last_seq:
        verdict.notes.append(f"{verdict.last_seq - head_seq} record(s) after the head file's seq {head_seq} "
                             "(written just before a crash?)")
    return verdict


# --- keys -----------------------------------------------------------------------


def load_key(env_name: str | None, key_file: str | None, *, create: bool = False,
             environ: dict[str, str] | None = None) -> tuple[bytes, str]:
    """The HMAC key and where it came from: the environment variable first, then the key file.

    With `create`, a missing key file is created with 32 random bytes (hex) and mode 0600.
    A key file readable by group or others is refused, as is a key shorter than 16 bytes.
    """
    env = os.environ if environ is None else environ
    if env_name and env.get(env_name):
        key = env[env_name].encode("utf-8")
        source = f"${env_name}"
    elif key_file:
        path = Path(key_file).expanduser()
        if not path.exists():
            if not create:
                raise AuditError(f"audit key file {path} does not exist")
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, secrets.token_hex(32).encode() + b"\n")
            finally:
                os.close(fd)
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise AuditError(f"audit key file {path} is accessible by group or others "
                             f"(mode {stat.S_IMODE(mode):o}); chmod 600 it")
        key = path.read_bytes().strip()
        source = str(path)
    else:
        raise AuditError(
            f"no audit key: set ${env_name} or audit_key_file" if env_name else "no audit key: set audit_key_file"
        )
    if len(key) < MIN_KEY_BYTES:
        raise AuditError(f"audit key from {source} is shorter than {MIN_KEY_BYTES} bytes")
    return key, source


# --- export -------------------------------------------------------------------

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """`90s`, `15m`, `12h`, `30d`, `2w` -> seconds."""
    m = _DURATION.match(text.strip().lower())
    if not m:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 15m, 12h, 30d, 2w)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_when(text: str, now: float | None = None) -> float:
    """An ISO time (`2025-01-31`, `2025-01-31T12:00Z`) or a duration ago (`2h`)."""
    now = time.time() if now is None else now
    try:
        return now - parse_duration(text)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"not a time: {text!r} (use ISO 8601 like 2025-01-31T12:00Z, or a duration like 2h)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


@dataclass
class Filter:
    """Export selection; every given criterion must match (values within one criterion: any)."""

    since: float | None = None
    until: float | None = None
    subjects: tuple[str, ...] = ()
    tools: tuple[str, ...] = ()
    actions: tuple[str, ...] = ()
    sessions: tuple[str, ...] = ()

    def match(self, rec: dict[str, Any]) -> bool:
        if self.since is not None or self.until is not None:
            try:
                t = parse_iso(rec["time"])
            except (KeyError, TypeError, ValueError):
                return False
            if self.since is not None and t < self.since:
                return False
            if self.until is not None and t >= self.until:
                return False
        if self.subjects and rec.get("subject") not in self.subjects:
            return False
        if self.tools and rec.get("tool") not in self.tools:
            return False
        if self.actions and rec.get("action") not in self.actions:
            return False
        if self.sessions and rec.get("session") not in self.sessions:
            return False
        return True


def read_records(lines: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    for raw in lines:
        if raw.strip():
            yield json.loads(raw)


CSV_COLUMNS = (
    "seq", "time", "session", "subject", "groups", "client_id", "upstream", "direction", "kind", "method",
    "id", "tool", "resource", "prompt", "task", "target", "action", "rule", "stage", "reason", "masking", "approval",
    "latency_ms", "status", "rpc", "error", "flow", "hash",
)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return str(value)


def write_csv(records: Iterable[dict[str, Any]], out: IO[str]) -> int:
    w = csv.writer(out, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    n = 0
    for rec in records:
        w.writerow([_cell(rec.get(c)) for c in CSV_COLUMNS])
        n += 1
    return n


def write_json(records: Iterable[dict[str, Any]], out: IO[str]) -> int:
    """A JSON array, one record per line (streams: never holds the whole export)."""
    n = 0
    out.write("[")
    for rec in records:
        out.write(",\n" if n else "\n")
        out.write(json.dumps(rec, sort_keys=True, ensure_ascii=False))
        n += 1
    out.write("\n]\n" if n else "]\n")
    return n
