"""
Forensics on the audit log and session recordings (`scripts/audit`, `scripts/replay`).

    audit verify LOG                     prove the chain intact, or name the first bad record
    audit export LOG [filters] [--format json|csv] [-o OUT]
    replay timeline FILE...              who asked what, and what the gateway did
    replay client FILE --to URL          re-send the recorded requests (mitmproxy client replay)
    replay server FILE... --port N       answer a client from the recording (mitmproxy server replay)

The key for `audit` comes from `--key-file`, else from the environment
variable `--key-env` (default BASTION_AUDIT_KEY), as for the gateway.

Exit status: 0 done; 1 the log does not verify (audit verify, export), or a
replayed request got no answer (replay client) or nothing to replay; 2 the
command could not run (bad arguments, a file missing or unreadable, no key).

This file is also a mitmproxy script: `replay client` loads it into the
replaying mitmdump for `SessionRemap` (below).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import urlsplit

from mitmproxy import exceptions, http, io
from mitmproxy.io import tnetstring
from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from mcp_bastion.cli.common import ArgumentParser, CannotRun, check_readable, check_writable, positive, run
from mcp_bastion.core import audit
from mcp_bastion.core.jsonrpc import ParseError, parse_body
from mcp_bastion.core.sse import SSEParser
from mcp_bastion.core.vocab import Meta
from mcp_bastion.glue.recording.audit_writer import DEFAULT_KEY_ENV
from mcp_bastion.glue.recording.facts import flow_facts
from mcp_bastion.glue.recording.scrub import REDACTED, scrub
from mcp_bastion.glue.recording.sessions import session_of

MITMDUMP = str(Path(sys.executable).parent / "mitmdump")

_ACTION_STYLE = {
    "allow": "green", "forward": "dim", "deny": "bold red", "error": "bold red",
    "mask": "magenta", "approve": "yellow",
}


# --- reading recordings -------------------------------------------------------------


def read_flows(paths: Sequence[str | os.PathLike]) -> list[http.HTTPFlow]:
    """All HTTP flows of the given files. A file cut off by a crash gives the flows before the cut.

    CannotRun for a file that cannot be opened, or that is not a flow file at all.
    """
    flows: list[http.HTTPFlow] = []
    for path in paths:
        check_readable(path, "recording")
        n = 0
        with open(path, "rb") as f:
            reader = io.FlowReader(f)
            try:
                for flow in reader.stream():
                    n += 1
                    if isinstance(flow, http.HTTPFlow):
                        flows.append(flow)
            except (exceptions.FlowReadException, ValueError, TypeError, KeyError) as e:
                if n == 0:
                    raise CannotRun(f"{path} is not a mitmproxy flow file ({e or type(e).__name__})") from None
                print(f"warning: {path}: unreadable after {n} flows ({e or type(e).__name__})", file=sys.stderr)
    return flows


def _recorded_latency(flow: http.HTTPFlow) -> float | None:
    note = flow.metadata.get(Meta.RECORD) or {}
    if note.get("latency_ms") is not None:
        return note["latency_ms"]
    if flow.response is not None and flow.response.timestamp_end and flow.request.timestamp_start:
        return round((flow.response.timestamp_end - flow.request.timestamp_start) * 1000, 3)
    return None


def timeline_rows(flows: Iterable[http.HTTPFlow]) -> list[dict[str, Any]]:
    """One row per message, as the audit log would have it, in the order requests arrived."""
    rows = []
    for flow in sorted(flows, key=lambda f: f.request.timestamp_start or 0):
        note = flow.metadata.get(Meta.RECORD) or {}
        facts = flow_facts(flow, incomplete=note.get("incomplete"), latency_ms=_recorded_latency(flow))
        facts.session = note.get("session") or facts.session
        for rec in audit.build_records(facts):
            rec["_t"] = facts.started
            if note.get("stream"):
                rec["stream"] = note["stream"]
            if note.get("replica"):
                rec["replica"] = note["replica"]  # which gateway served it (replica_id)
            rows.append(rec)
    return rows


_HTTP_LABEL = {"GET": "GET (event stream)", "DELETE": "DELETE (end session)"}


def _message(rec: dict[str, Any]) -> str:
    out = rec.get("method") or rec.get("kind") or "?"
    if rec.get("kind") == "http":
        out = _HTTP_LABEL.get(out, out)
    target = next((rec[k] for k in ("tool", "prompt", "resource", "task", "target") if rec.get(k)), None)
    if target:
        out += f" {target}"
    if rec.get("id") is not None:
        out += f" #{rec['id']}"
    return out


def _detail(rec: dict[str, Any]) -> str:
    parts = []
    if rec.get("reason") and rec.get("action") not in ("allow", "forward"):
        parts.append(str(rec["reason"]))
    masked: dict[str, int] = {}
    for d in rec.get("decisions") or ():
        for f in d.get("masked") or ():
            masked[f["detector"]] = masked.get(f["detector"], 0) + int(f.get("count") or 0)
    if masked:
        profile = (rec.get("masking") or {}).get("profile")
        parts.append("masked " + ", ".join(f"{name} x{n}" for name, n in sorted(masked.items()))
                     + (f" ({profile})" if profile else ""))
    elif rec.get("masking") is not None:
        parts.append(f"masking {json.dumps(rec['masking'], sort_keys=True)}")
    if rec.get("approval") is not None:
        parts.append(f"approval {json.dumps(rec['approval'], sort_keys=True)}")
    if rec.get("pins"):
        parts.append("pins: " + ", ".join(rec["pins"]))
    if rec.get("error"):
        parts.append(str(rec["error"]))
    stream = rec.get("stream")
    if stream and stream.get("truncated"):
        parts.append(f"stream truncated in recording: {stream['stored_bytes']} of {stream['bytes']} bytes stored")
    return "; ".join(parts)


WIDE = 140  # from this console width on, one column per field; below it the compact layout


def render_timeline(flows: list[http.HTTPFlow], sources: Sequence[str], console: Console) -> None:
    """The header panel and one table row per message, laid out for the console's width.

    Wide consoles get one column per field. Narrower ones (a 100-column terminal) get the compact
    layout: the detail goes under the message, the relative time and, for a one-subject recording
    (the header names the subject), the `who` column are left out; every cell wraps rather than
    being cut.
    """
    rows = timeline_rows(flows)
    if not rows:
        console.print("no flows")
        return
    start = rows[0]["_t"]
    end = max((f.response.timestamp_end or 0) if f.response else (f.request.timestamp_start or 0) for f in flows)
    subjects = sorted({r.get("subject") or "anonymous" for r in rows})
    sessions = sorted({r.get("session") or "?" for r in rows})
    upstreams = sorted({r.get("upstream") or "?" for r in rows})
    events = sum((f.metadata.get(Meta.MCP) or {}).get("sse_events", 0) for f in flows)
    head = Text()
    head.append("recording ", style="bold")
    head.append(", ".join(str(s) for s in sources))
    head.append(f"\nsession   {', '.join(sessions)}\nsubject   {', '.join(subjects)}\nupstream  {', '.join(upstreams)}")
    head.append(f"\nfrom      {audit.iso_time(start)}  to {audit.iso_time(max(end, start))}")
    head.append(f"\n{len(flows)} flows, {len(rows)} messages, {events} SSE events")
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["action"]] = counts.get(r["action"], 0) + 1
    head.append("\n" + "  ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    console.print(Panel(head, title="mcp-bastion session timeline", expand=False))
    if console.width >= WIDE:
        console.print(_wide_table(rows, start))
    else:
        console.print(_compact_table(rows, show_who=len(subjects) > 1, width=console.width))


def _rec_status(rec: dict[str, Any]) -> str:
    status = "" if rec.get("status") is None else str(rec["status"])
    if rec.get("rpc"):
        status += f" {rec['rpc']}"
    return status


def _cells(rec: dict[str, Any]) -> dict[str, Any]:
    action = rec["action"]
    return {
        "time": rec["time"][11:23],
        "who": rec.get("subject") or "anonymous",
        "arrow": "→" if rec.get("direction") == "client_to_server" else "←",
        "message": _message(rec),
        "action": Text(action, style=_ACTION_STYLE.get(action, "cyan")),
        "rule": rec.get("rule") or "",
        "status": _rec_status(rec),
        "ms": "" if rec.get("latency_ms") is None else f"{rec['latency_ms']:.0f}",
        "detail": _detail(rec),
    }


def _wide_table(rows: list[dict[str, Any]], start: float) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_lines=False)
    for col, kw in (("time (UTC)", {"no_wrap": True}), ("+s", {"justify": "right", "no_wrap": True}),
                    ("who", {"overflow": "fold"}), ("", {"no_wrap": True}), ("message", {"overflow": "fold"}),
                    ("action", {"no_wrap": True}), ("rule", {"overflow": "fold"}), ("status", {"no_wrap": True}),
                    ("ms", {"justify": "right", "no_wrap": True}), ("detail", {"overflow": "fold"})):
        table.add_column(col, **kw)
    for r in rows:
        c = _cells(r)
        table.add_row(c["time"], f"{r['_t'] - start:.3f}", c["who"], c["arrow"], c["message"], c["action"],
                      c["rule"], c["status"], c["ms"], c["detail"])
    return table


def _compact_table(rows: list[dict[str, Any]], show_who: bool, width: int) -> Table:
    """For narrow consoles: the detail under the message (dimmed), fewer columns, nothing cut off.

    Widths are chosen here rather than by rich: the time, action, status and ms columns keep their
    width, a rule id stays whole while it can, and the message column takes what is left.
    """
    cells = [_cells(r) for r in rows]

    def widest(key: str, floor: int) -> int:
        return max([floor] + [cell_len(str(c[key])) for c in cells])

    fixed = {"time (UTC)": 12, "action": widest("action", 6), "status": widest("status", 6), "ms": widest("ms", 2)}
    who = min(widest("who", 3), 16) if show_who else 0
    # Between two columns: the right padding of one, the border (a space in this box), the left padding of the
    # next; no padding or border at the outer edges.
    gaps = 3 * (len(fixed) + 2 + bool(show_who) - 1)
    room = width - sum(fixed.values()) - who - gaps  # for the message and rule columns
    # The message column gets room for its longest word (a tool name) where it can, the rule column
    # for its longest id; what does not fit wraps.
    longest_word = max([0] + [cell_len(w) for c in cells for w in f"{c['arrow']} {c['message']}".split()])
    message_want = max(24, min(longest_word, 40))
    want = 24 + min(widest("rule", 4), 8)
    if room < want and show_who:  # too narrow: a narrower who column first, then the status wraps
        cut = min(want - room, who - 8)
        who, room = who - cut, room + cut
    if room < want:
        cut = min(want - room, fixed["status"] - 6)
        fixed["status"], room = fixed["status"] - cut, room + cut
    rule = min(widest("rule", 4), max(room - message_want, 8))
    message = max(room - rule, 16)
    table = Table(box=box.SIMPLE_HEAD, show_lines=False, pad_edge=False, show_edge=False)
    table.add_column("time (UTC)", no_wrap=True, width=fixed["time (UTC)"])
    if show_who:
        table.add_column("who", overflow="fold", width=who)
    table.add_column("message", overflow="fold", width=message)
    table.add_column("action", no_wrap=True, width=fixed["action"])
    table.add_column("rule", overflow="fold", width=rule)
    table.add_column("status", overflow="fold", width=fixed["status"])
    table.add_column("ms", justify="right", no_wrap=True, width=fixed["ms"])
    for c in cells:
        text = Text(f"{c['arrow']} {c['message']}")
        if c["detail"]:
            text.append("\n" + c["detail"], style="dim")
        table.add_row(c["time"], *([c["who"]] if show_who else []), text, c["action"], c["rule"], c["status"],
                      c["ms"])
    return table


# --- comparing answers --------------------------------------------------------------


def answers(flow: http.HTTPFlow) -> dict[Any, tuple[str, Any]]:
    """JSON-RPC answers in a response body (JSON or event stream): id -> ("result"|"error", value)."""
    if flow.response is None or not flow.response.raw_content:
        return {}
    ctype = (flow.response.headers.get("content-type") or "").split(";")[0].strip().lower()
    bodies: list[bytes | str] = []
    if ctype == "text/event-stream":
        parser = SSEParser(max_event_bytes=len(flow.response.raw_content) + 1)
        bodies = [ev.data for ev in parser.feed(flow.response.raw_content) if ev.has_data and ev.event == "message"]
    elif ctype == "application/json":
        bodies = [flow.response.raw_content]
    out = {}
    for body in bodies:
        try:
            parsed = parse_body(body, max_bytes=1 << 31)
        except ParseError:
            continue
        for m in parsed.messages:
            if m.kind in ("response", "error") and m.id is not None:
                out[m.id] = ("result" if m.kind == "response" else "error", m.params)
    return out


def _outcome(before: dict, after: dict) -> str:
    if not before and not after:
        return "no answer"
    if not after:
        return "no answer now"
    if before == after:
        return "same"
    kinds = {i: k for i, (k, _) in before.items()}, {i: k for i, (k, _) in after.items()}
    return "differs" if kinds[0] == kinds[1] else "changed kind"


# --- client replay ------------------------------------------------------------------


class SessionRemap:
    """mitmproxy addon for a client replay: use the session id the server hands out now.

    The replayed initialize gets a new `Mcp-Session-Id`; every later replayed
    request carrying the recorded id is sent with the new one instead.
    """

    def __init__(self) -> None:
        self.map: dict[str, str] = {}

    def request(self, flow: http.HTTPFlow) -> None:
        sid = flow.request.headers.get("mcp-session-id")
        if flow.is_replay == "request" and sid in self.map:
            flow.request.headers["mcp-session-id"] = self.map[sid]

    def response(self, flow: http.HTTPFlow) -> None:
        recorded = flow.metadata.get(Meta.REPLAY_SESSION)
        new = flow.response.headers.get("mcp-session-id") if flow.response else None
        if flow.is_replay == "request" and recorded and new and new != recorded:
            self.map[recorded] = new


addons = [SessionRemap()]


def prepare_client_replay(flows: Iterable[http.HTTPFlow], to: str | None, headers: Sequence[tuple[str, str]],
                          include_streams: bool = False, include_refused: bool = False
                          ) -> tuple[list[http.HTTPFlow], list[tuple[http.HTTPFlow, str]]]:
    """Copies of the flows to re-send, in arrival order, and the ones skipped with why.

    Redacted credentials are removed (give real ones with `headers`); requests
    the gateway refused are skipped unless `include_refused` (re-sending them
    straight to a server would do what the gateway prevented); long-lived GET
    event streams are skipped unless `include_streams`.
    """
    target = urlsplit(to) if to else None
    chosen, skipped = [], []
    for flow in sorted(flows, key=lambda f: f.request.timestamp_start or 0):
        if flow.request.method == "GET" and not include_streams:
            skipped.append((flow, "GET event stream (use --include-streams)"))
            continue
        if flow.metadata.get(Meta.REFUSED) and not include_refused:
            skipped.append((flow, "refused by the gateway (use --include-refused)"))
            continue
        if flow.request.raw_content is None:
            skipped.append((flow, "request body not recorded"))
            continue
        f = flow.copy()
        req = f.request
        for name in {k.lower() for k, v in req.headers.items(multi=True) if v == REDACTED}:
            del req.headers[name]
        for name in [k for k, v in req.query.items(multi=True) if v == REDACTED]:
            del req.query[name]
        for name, value in headers:
            req.headers[name] = value
        if target is not None:
            req.scheme = target.scheme or "http"
            req.host = target.hostname or req.host
            req.port = target.port or (443 if req.scheme == "https" else 80)
            req.host_header = target.netloc
            if target.path not in ("", "/"):
                req.path = target.path + (f"?{urlsplit(req.path).query}" if urlsplit(req.path).query else "")
        f.metadata[Meta.REPLAY_SESSION] = session_of(flow)
        f.metadata[Meta.REPLAY_OF] = flow.id
        chosen.append(f)
    return chosen, skipped


def write_flows(flows: Iterable[http.HTTPFlow], path: str | os.PathLike) -> None:
    with open(path, "wb") as fo:
        w = io.FlowWriter(fo)
        for f in flows:
            w.add(f)


def write_scrubbed(flows: Iterable[http.HTTPFlow], path: str | os.PathLike, secret_headers: Sequence[str]) -> None:
    """Write flows as a recording would be: credentials redacted (as the Recorder does, plus
    `secret_headers`), readable by the owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    with os.fdopen(fd, "wb") as fo:
        for f in flows:
            state = f.get_state()
            scrub(state, [h.lower() for h in secret_headers])
            tnetstring.dump(state, fo)


def _target(url: str | None) -> str | None:
    if url is None:
        return None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises on a port out of range or not a number)
    except ValueError as e:
        raise CannotRun(f"--to {url!r}: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CannotRun(f"--to {url!r}: give a base URL such as http://127.0.0.1:8000/mcp")
    return url


def client_replay(args: argparse.Namespace, console: Console) -> int:
    """Re-send the recorded requests. Exit status 1 when a request gets no answer (or nothing is replayed)."""
    headers = [_header(h) for h in args.header]
    _target(args.to)
    if args.save:
        check_writable(args.save, "--save file")
    recorded = read_flows(args.files)
    chosen, skipped = prepare_client_replay(recorded, args.to, headers, args.include_streams, args.include_refused)
    for flow, why in skipped:
        console.print(f"[dim]skipped {_flow_label(flow)}: {why}[/dim]")
    if not chosen:
        console.print("nothing to replay")
        return 1
    with tempfile.TemporaryDirectory(prefix="bastion-replay-") as tmp:
        queue = Path(tmp) / "queue.mitm"
        out = Path(tmp) / "replayed.mitm"
        write_flows(chosen, queue)
        cmd = [MITMDUMP, "-n", "-q", "-s", __file__, "--client-replay", str(queue),
               "--set", f"save_stream_file={out}"]
        proc = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0 or not out.exists():
            said = " ".join(proc.stdout.split())[-500:]
            raise CannotRun(f"the replaying mitmdump exited with {proc.returncode}" + (f": {said}" if said else ""))
        replayed_flows = read_flows([out]) if out.stat().st_size else []
        if args.save:  # what mitmdump saved carries the credentials given with --header: keep none of them
            write_scrubbed(replayed_flows, args.save, [name for name, _ in headers])
        replayed = {f.id: f for f in replayed_flows}
    by_id = {f.id: f for f in recorded}
    table = Table(box=box.SIMPLE_HEAD, title=f"client replay of {len(chosen)} requests")
    for col in ("message", "recorded", "replayed", "answer"):
        table.add_column(col)
    differing = 0
    unanswered: dict[str, list[str]] = {}  # why -> the requests
    for f in chosen:
        new = replayed.get(f.id)
        original = by_id[f.metadata[Meta.REPLAY_OF]]
        before, after = answers(original), answers(new) if new else {}
        outcome = _outcome(before, after) if new is not None and new.response is not None else "no response"
        differing += outcome not in ("same", "no answer")
        if outcome in ("no response", "no answer now"):  # the recording has an answer, or an HTTP response
            unanswered.setdefault(_why_unanswered(new), []).append(_flow_label(f))
        table.add_row(_flow_label(f), _status(original), _status(new), outcome)
    console.print(table)
    if args.save:
        console.print(f"replayed flows saved to {args.save}")
    missing = sum(len(v) for v in unanswered.values())
    console.print(f"{len(chosen) - missing} of {len(chosen)} requests answered; "
                  f"{differing} answers differ from the recording")
    if unanswered:
        print(f"scripts/replay client: {missing} of {len(chosen)} requests got no answer on replay: "
              + "; ".join(f"{', '.join(labels)} ({why})" for why, labels in unanswered.items()), file=sys.stderr)
        return 1
    return 0


def _why_unanswered(flow: http.HTTPFlow | None) -> str:
    if flow is None:
        return "not replayed"
    if flow.response is None:
        return f"error: {flow.error.msg}" if flow.error else "no response"
    return f"HTTP {flow.response.status_code} without the recorded answer"


def _status(flow: http.HTTPFlow | None) -> str:
    if flow is None:
        return "-"
    if flow.response is None:
        return f"error: {flow.error.msg}" if flow.error else "-"
    kinds = sorted({k for k, _ in answers(flow).values()})
    return f"{flow.response.status_code}" + (f" {'/'.join(kinds)}" if kinds else "")


def _flow_label(flow: http.HTTPFlow) -> str:
    summaries = (flow.metadata.get(Meta.MCP) or {}).get("request") or []
    if not summaries:
        return f"{flow.request.method} {flow.request.path}"
    # A summary names a resource `uri`; an audit record (what _message reads) names it `resource`.
    return ", ".join(_message(dict(s, resource=s.get("uri"))) for s in summaries[:3]) + (
        f" (+{len(summaries) - 3})" if len(summaries) > 3 else "")


def _header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep or not name.strip() or any(c in text for c in "\r\n\0"):
        raise CannotRun(f"--header expects 'Name: value', got {text!r}")
    if not all(c.isascii() and (c.isalnum() or c in "!#$%&'*+-.^_`|~") for c in name.strip()):
        raise CannotRun(f"--header {name.strip()!r} is not an HTTP header name")
    return name.strip(), value.strip()


# --- server replay ------------------------------------------------------------------


def server_replay_command(queue: Path, args: argparse.Namespace) -> list[str]:
    cmd = [MITMDUMP, "--listen-host", args.listen_host, "--mode", f"reverse:http://127.0.0.1:9@{args.port}",
           "--server-replay", str(queue),
           "--set", "server_replay_ignore_host=true", "--set", "server_replay_ignore_port=true",
           "--set", f"server_replay_extra={args.extra}", "--set", "keepserving=true",
           "--set", "connection_strategy=lazy"]
    if args.reuse:
        cmd += ["--set", "server_replay_reuse=true"]
    if args.loose:
        cmd += ["--set", "server_replay_ignore_content=true"]
    return cmd


def _check_listen(host: str, port: int) -> None:
    """CannotRun if mitmdump could not listen on host:port (taken, or not an address of this machine)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        with socket.socket(infos[0][0], socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(infos[0][4])
    except (OSError, IndexError) as e:
        reason = getattr(e, "strerror", None) or e
        raise CannotRun(f"cannot listen on {host}:{port}: {reason}") from None


def server_replay(args: argparse.Namespace, console: Console) -> int:
    flows = [f for f in read_flows(args.files) if f.response is not None]
    if not flows:
        console.print("no recorded responses to serve")
        return 1
    _check_listen(args.listen_host, args.port)
    flows.sort(key=lambda f: f.request.timestamp_start or 0)
    with tempfile.TemporaryDirectory(prefix="bastion-replay-") as tmp:
        queue = Path(tmp) / "responses.mitm"
        write_flows(flows, queue)
        console.print(f"serving {len(flows)} recorded responses on http://{args.listen_host}:{args.port} "
                      f"(unmatched requests: {args.extra}); Ctrl-C to stop")
        proc = subprocess.Popen(server_replay_command(queue, args))
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            return 0  # stopped as asked
        if code != 0:
            raise CannotRun(f"mitmdump exited with {code}")
        return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


# --- audit commands -------------------------------------------------------------------


def _cannot_run(message: str) -> NoReturn:
    """The command could not run (exit 2): distinct from a log that does not verify (exit 1)."""
    raise CannotRun(message)


def _key(args: argparse.Namespace) -> bytes:
    if not args.key_file and not os.environ.get(args.key_env):
        _cannot_run(f"no key: pass --key-file FILE or set ${args.key_env}")
    if args.key_file and os.path.isdir(args.key_file):
        _cannot_run(f"audit key file {args.key_file} is a directory")
    try:
        key, _ = audit.load_key(None if args.key_file else args.key_env, args.key_file)
    except audit.AuditError as e:
        _cannot_run(f"{e}")
    except OSError as e:
        _cannot_run(f"cannot read the audit key file {args.key_file}: {e.strerror or e}")
    return key


def _verify(log: str, args: argparse.Namespace, key: bytes) -> audit.Verdict:
    try:
        return audit.verify_file(log, key, require_head=not args.allow_missing_head)
    except (OSError, audit.AuditError) as e:
        _cannot_run(f"cannot verify {log}: {getattr(e, 'strerror', None) or e}")


def audit_verify(args: argparse.Namespace, console: Console) -> int:
    """Each log is its own chain (one per gateway replica): every one must verify, under the one key."""
    logs = list(dict.fromkeys(args.logs))  # a log named twice is verified once
    for log in logs:
        check_readable(log, "audit log")
    key = _key(args)
    tampered = 0
    for log in logs:
        v = _verify(log, args, key)
        for note in v.notes:
            console.print(f"note: {log}: {note}" if len(logs) > 1 else f"note: {note}")
        if v.ok:
            console.print(f"[green]OK[/green] {log}: {v.records} records, chain intact, last seq {v.last_seq}, "
                          f"last hash {v.last_hash[:16]}…")
            continue
        tampered += 1
        where = []
        if v.bad_line is not None:
            where.append(f"line {v.bad_line}")
        if v.bad_seq is not None:
            where.append(f"seq {v.bad_seq}")
        at = f" at {', '.join(where)}" if where else ""
        console.print(f"[bold red]TAMPERED[/bold red] {log}: first bad record{at}: {v.reason} "
                      f"({v.records} records before it are intact)")
    if len(logs) > 1:
        console.print(f"{len(logs)} logs: " + ("every chain intact" if not tampered
                                               else f"{tampered} tampered, {len(logs) - tampered} intact"))
    return 1 if tampered else 0


def _filter(args: argparse.Namespace) -> audit.Filter:
    try:
        return audit.Filter(
            since=audit.parse_when(args.since) if args.since else None,
            until=audit.parse_when(args.until) if args.until else None,
            subjects=tuple(args.subject), tools=tuple(args.tool), actions=tuple(args.action),
            sessions=tuple(args.session),
        )
    except ValueError as e:
        _cannot_run(str(e))


def audit_export(args: argparse.Namespace, console: Console) -> int:
    flt = _filter(args)
    check_readable(args.log, "audit log")
    if args.output and args.output != "-":
        check_writable(args.output, "output file")
    if not args.no_verify:
        v = _verify(args.log, args, _key(args))
        if not v.ok:
            console.print(f"[bold red]refusing to export[/bold red]: {args.log} does not verify "
                          f"(line {v.bad_line}, seq {v.bad_seq}): {v.reason}; --no-verify exports anyway")
            return 1
    writer = audit.write_csv if args.format == "csv" else audit.write_json
    with open(args.log, "rb") as src, _output(args.output) as out:
        n = writer((r for r in _records(args.log, src) if flt.match(r)), out)
    if args.output and args.output != "-":
        console.print(f"{n} records written to {args.output}")
    return 0


def _records(path: str, lines: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """The records of a log, one JSON object a line; CannotRun names the first line that is not one."""
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
        except ValueError:
            rec = None
        if not isinstance(rec, dict):
            raise CannotRun(f"{path} line {number} is not an audit record (scripts/audit verify {path} says more)")
        yield rec


@contextlib.contextmanager
def _output(path: str | None) -> Iterator[Any]:
    if not path or path == "-":
        yield sys.stdout
        sys.stdout.flush()
    else:
        with open(path, "w", encoding="utf-8", newline="") as f:
            yield f


# --- command line ---------------------------------------------------------------------


GROUPS = ("audit", "replay")


def parser(group: str) -> argparse.ArgumentParser:
    """The command line of `scripts/audit` (group "audit") or `scripts/replay` (group "replay")."""
    _, usage, key, status, _ = __doc__.strip().split("\n\n")
    lines = "\n".join("  scripts/" + line.strip() for line in usage.splitlines() if line.strip().startswith(group))
    description = {"audit": "Verify the hash chain of a gateway's audit log, or export its records.",
                   "replay": "Read a session recording: its timeline, or replay it as the client or the server."}
    p = ArgumentParser(prog=f"scripts/{group}", description=description[group],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="\n\n".join([lines, *([key] if group == "audit" else []), status]))
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    if group == "audit":
        for name in ("verify", "export"):
            sp = sub.add_parser(name, help="prove the chain intact, or name the first bad record" if name == "verify"
                                else "write the records (filtered) as JSON or CSV")
            if name == "verify":
                sp.add_argument("logs", nargs="+", metavar="log",
                                help="an audit log (JSON Lines); several (one per gateway replica, each its own "
                                     "chain) are each verified, and all must be intact")
            else:
                sp.add_argument("log", help="the audit log (JSON Lines)")
            sp.add_argument("--key-file", help="file holding the HMAC key")
            sp.add_argument("--key-env", default=DEFAULT_KEY_ENV,
                            help="environment variable holding the key (default %(default)s)")
            sp.add_argument("--allow-missing-head", action="store_true",
                            help="accept a log without its .head file (records removed at the end go unnoticed)")
            if name == "export":
                sp.add_argument("--since", help="ISO time or duration ago (2h, 7d)")
                sp.add_argument("--until", help="ISO time or duration ago (exclusive)")
                sp.add_argument("--subject", action="append", default=[], help="repeatable")
                sp.add_argument("--tool", action="append", default=[], help="repeatable")
                sp.add_argument("--action", action="append", default=[], help="allow, deny, mask, ... (repeatable)")
                sp.add_argument("--session", action="append", default=[], help="repeatable")
                sp.add_argument("--format", choices=("json", "csv"), default="json")
                sp.add_argument("-o", "--output", help="file to write (default: stdout)")
                sp.add_argument("--no-verify", action="store_true", help="export without verifying the chain first")
        return p

    t = sub.add_parser("timeline", help="print who asked what and what the gateway did")
    t.add_argument("files", nargs="+", metavar="FILE", help="a session recording (the Recorder's *.mitm)")
    t.add_argument("--json", action="store_true", help="one JSON object per message instead of a table")
    c = sub.add_parser("client", help="re-send the recorded requests to a server (mitmproxy client replay)",
                       epilog="Exit status: 0 every request was answered, 1 a request got no answer on replay "
                              "(named on stderr) or nothing was left to replay, 2 could not run.")
    c.add_argument("files", nargs="+", metavar="FILE", help="a session recording")
    c.add_argument("--to", help="base URL to send to (default: the recorded upstream), e.g. http://127.0.0.1:8000/mcp")
    c.add_argument("--header", action="append", default=[], help="'Name: value' added to every request (credentials)")
    c.add_argument("--include-streams", action="store_true", help="also re-open recorded GET event streams")
    c.add_argument("--include-refused", action="store_true", help="also re-send requests the gateway refused")
    c.add_argument("--save", help="write the replayed flows to this file")
    s = sub.add_parser("server", help="serve the recorded responses in place of the server (mitmproxy server replay)")
    s.add_argument("files", nargs="+", metavar="FILE", help="a session recording")
    s.add_argument("--port", type=_port, default=8080, help="port to listen on (default %(default)s)")
    s.add_argument("--listen-host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    s.add_argument("--extra", default="404", choices=("404", "400", "500", "204", "kill"),
                   help="answer to a request the recording has no match for")
    s.add_argument("--reuse", action="store_true", help="serve a recorded response more than once")
    s.add_argument("--loose", action="store_true", help="match requests by method and path only, in recorded order")
    return p


def _port(text: str) -> int:
    port = positive(int)(text)
    if port > 65535:
        raise argparse.ArgumentTypeError(f"not a port (1-65535): {text}")
    return port


def console_for(stream: Any = None) -> Console:
    """A terminal gets its own width; a pipe COLUMNS if set, else 160 columns, lines not wrapped."""
    stream = stream or sys.stdout
    tty = stream.isatty()
    columns = os.environ.get("COLUMNS", "")
    width = int(columns) if columns.isdigit() and int(columns) > 0 else None
    console = Console(file=stream, highlight=False, width=width or (None if tty else 160),
                      soft_wrap=not tty and width is None)
    console.on_broken_pipe = _broken_pipe  # rich would exit 1 (our "found something"): the reader left early
    return console


def _broken_pipe() -> NoReturn:
    raise BrokenPipeError(32, "Broken pipe")


def main(argv: Sequence[str] | None = None) -> int:
    """`scripts/audit ...` is main(["audit", ...]), `scripts/replay ...` main(["replay", ...])."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in GROUPS:
        raise CannotRun("say which: scripts/audit ... or scripts/replay ... (python -m mcp_bastion.cli.forensics "
                        "audit|replay ...)")
    args = parser(argv[0]).parse_args(argv[1:])
    args.group = argv[0]
    previous = signal.signal(signal.SIGTERM, _interrupt)  # stopped: still remove the temp files of a replay
    try:
        return _run(args)
    except CannotRun as e:
        print(f"scripts/{args.group} {args.cmd}: {e}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    console = console_for()
    if args.group == "audit":
        return (audit_verify if args.cmd == "verify" else audit_export)(args, console)
    if args.cmd == "timeline":
        flows = read_flows(args.files)
        if args.json:
            for row in timeline_rows(flows):
                row.pop("_t", None)
                print(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str))
            return 0
        render_timeline(flows, args.files, console)
        return 0
    if args.cmd == "client":
        return client_replay(args, console)
    return server_replay(args, console)


if __name__ == "__main__":
    run(main, f"scripts/{sys.argv[1]}" if sys.argv[1:2] and sys.argv[1] in GROUPS else "mcp_bastion.cli.forensics")
