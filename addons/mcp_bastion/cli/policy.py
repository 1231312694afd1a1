"""
scripts/policy: tools for people who write rulesets.

    scripts/policy check FILE...
        Validate rulesets; print every problem as FILE:LINE: rule 'ID': message.
    scripts/policy explain RULESET [identity options] [--upstream HOST:PORT] [--direction D] MESSAGE
        Which rule decides a JSON-RPC message (or batch) for an identity, and why
        each earlier rule did not match. MESSAGE is JSON text, @FILE, or - (stdin);
        http:GET / http:DELETE stand for the body-less requests.
    scripts/policy what-if RULESET SESSION... [--baseline OLD_RULESET]
        Re-evaluate recorded sessions (mitmproxy flow files, e.g. the Recorder's
        *.mitm) under RULESET and list every decision that would change, compared
        with the decisions recorded in the session (or with OLD_RULESET).

Exit status: 0 fine / nothing changes, 1 problems found / decisions change,
2 the command itself could not run (bad arguments, unreadable input).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from mcp_bastion.cli.common import ArgumentParser, CannotRun, check_readable, run
from mcp_bastion.core.identity import Identity
from mcp_bastion.core.jsonrpc import ParseError, parse_body
from mcp_bastion.core.message import Message, http_request
from mcp_bastion.core.rules import Decision, Ruleset, RulesetError
from mcp_bastion.core.sse import SSEError, SSEParser
from mcp_bastion.core.vocab import Meta

_STAGE = {"client_to_server": "policy", "server_to_client": "resp:policy"}


class UsageError(CannotRun):
    pass


def main(argv: list[str] | None = None) -> int:
    doc = __doc__.strip()
    ap = ArgumentParser(prog="scripts/policy", description="Check, explain and try out mcp-bastion rulesets.",
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        epilog="\n".join(doc.splitlines()[1:]))
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="validate ruleset files (errors with line numbers)")
    p.add_argument("files", nargs="+", metavar="FILE")

    p = sub.add_parser("explain", help="which rule decides a message for an identity, and why")
    p.add_argument("ruleset", metavar="RULESET")
    p.add_argument("message", metavar="MESSAGE",
                   help="JSON-RPC message or batch: JSON text, @FILE, - for stdin, or http:GET")
    p.add_argument("--sub", help="the caller's subject (omit all identity options for an anonymous caller)")
    p.add_argument("--group", action="append", default=[], help="a group of the caller (repeatable)")
    p.add_argument("--issuer", help="the token issuer (iss)")
    p.add_argument("--identity", help='the identity as JSON claims, e.g. \'{"sub": "alice", "groups": ["eng"]}\'')
    p.add_argument("--upstream", help="the upstream server as host:port")
    p.add_argument("--direction", choices=("client_to_server", "server_to_client"), default="client_to_server")

    p = sub.add_parser("what-if", help="list the decisions of recorded sessions that a ruleset would change")
    p.add_argument("ruleset", metavar="RULESET")
    p.add_argument("sessions", nargs="+", metavar="SESSION", help="mitmproxy flow file (the Recorder's *.mitm)")
    p.add_argument("--baseline", metavar="OLD_RULESET",
                   help="compare with this ruleset instead of the recorded decisions")

    args = ap.parse_args(argv)
    out = sys.stdout
    try:
        if args.command == "check":
            return check(args.files, out)
        if args.command == "explain":
            return explain(args, out)
        return what_if(args.ruleset, args.sessions, args.baseline, out)
    except CannotRun as e:
        print(f"scripts/policy {args.command}: {e}", file=sys.stderr)
        return 2


def _load(path: str) -> Ruleset:
    check_readable(path, "ruleset")
    try:
        return Ruleset.load(path)
    except RulesetError as e:
        problems = [str(p) for p in getattr(e, "problems", None) or [e]]
        more = (f" (and {len(problems) - 1} more: scripts/policy check {path} lists them)"
                if len(problems) > 1 else "")
        raise UsageError(f"ruleset refused: {problems[0]}{more}") from None


# --- check -----------------------------------------------------------------


def check(files: list[str], out) -> int:
    status = 0
    for path in files:
        try:
            check_readable(path, "ruleset")
        except CannotRun as e:  # not a problem of the ruleset: this file could not be checked at all
            print(f"scripts/policy check: {e}", file=sys.stderr)
            status = 2
            continue
        try:
            r = Ruleset.load(path)
        except RulesetError as e:
            status = max(status, 1)
            for p in e.problems:
                print(p, file=out)
            continue
        for w in r.warnings:
            print(w, file=out)
        print(f"{path}: ok ({len(r.rules)} rules, default {r.default})", file=out)
    return status


# --- explain ---------------------------------------------------------------


def _identity(args) -> Identity:
    if args.identity:
        try:
            claims = json.loads(args.identity)
        except json.JSONDecodeError as e:
            raise UsageError(f"--identity is not JSON: {e}") from None
        if not isinstance(claims, dict):
            raise UsageError("--identity must be a JSON object of claims")
        for key in ("sub", "iss", "email", "name", "client_id"):
            if claims.get(key) is not None and not isinstance(claims[key], str):
                raise UsageError(f"--identity: {key} must be a string")
        for key in ("groups", "scopes"):
            value = claims.get(key)
            if value is not None and not isinstance(value, str) and not (
                    isinstance(value, list) and all(isinstance(v, str) for v in value)):
                raise UsageError(f"--identity: {key} must be a list of strings")
    else:
        claims = {"sub": args.sub, "groups": args.group, "iss": args.issuer}
        if args.sub is None:
            if args.group or args.issuer:
                raise UsageError("--group/--issuer need --sub (a caller without subject is anonymous)")
            claims = None
    return Identity.from_claims(claims)


def _messages(arg: str) -> list[Message]:
    if arg.lower().startswith("http:"):
        if not arg[5:].isalpha():
            raise UsageError(f"{arg!r}: give an HTTP method after http:, e.g. http:GET or http:DELETE")
        return [http_request(arg[5:])]
    if arg == "-":
        text = getattr(sys.stdin, "buffer", sys.stdin).read()
    elif arg.startswith("@"):
        if not arg[1:]:
            raise UsageError("@ needs a file name: @FILE")
        check_readable(arg[1:], "message file")
        with open(arg[1:], "rb") as f:
            text = f.read()
    else:
        text = arg
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UsageError(f"{'stdin' if arg == '-' else arg[1:]} is not UTF-8 text (byte {e.start})") from None
    try:
        body = parse_body(text)
    except ParseError as e:
        raise UsageError(f"the gateway would refuse this body before any rule: {e}") from None
    return body.messages


def _describe(identity: Identity) -> str:
    if not identity.authenticated:
        return "anonymous (no identity)"
    parts = [identity.sub, f"groups={list(identity.groups)}"]
    if identity.iss:
        parts.append(f"iss={identity.iss}")
    return " ".join(parts)


def explain(args, out) -> int:
    ruleset = _load(args.ruleset)
    identity = _identity(args)
    messages = _messages(args.message)
    print(f"identity:  {_describe(identity)}", file=out)
    print(f"upstream:  {args.upstream or '(none)'}    direction: {args.direction}", file=out)
    for m in messages:
        print(f"\nmessage:   {m.label()}", file=out)
        if m.kind == "invalid":
            print("decision:  refused before any rule: not a valid JSON-RPC 2.0 message", file=out)
            continue
        steps, d = ruleset.explain(identity, m, args.direction, args.upstream)
        width = max(len(s.rule) for s in steps)
        for s in steps:
            where = f"line {s.line}" if s.line else "-"
            mark = "MATCH" if s.matched else "no"
            print(f"  {where:>9}  {s.rule:<{width}}  {mark:<5}  {s.detail}", file=out)
        print(f"decision:  {_verdict(d)}", file=out)
    return 0


def _verdict(d: Decision) -> str:
    text = f"{d.action} by rule '{d.rule}'"
    if d.profile:
        text += f" (masking profile {d.profile})"
    if d.action != "allow" and d.reason:
        text += f": {d.reason}"
    return text


# --- what-if ------------------------------------------------------------------


@dataclass
class Recorded:
    """One message of a recorded session, with what was decided for it at the time."""

    session: str
    flow_index: int
    who: str
    direction: str
    message: Message
    identity: Identity
    upstream: str | None
    before: dict[str, Any] | None


def _read_flows(path: str) -> Iterator[Any]:
    from mitmproxy import exceptions, http, io

    check_readable(path, "session")
    try:
        with open(path, "rb") as f:
            for flow in io.FlowReader(f).stream():
                if isinstance(flow, http.HTTPFlow):
                    yield flow
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    except exceptions.FlowReadException as e:
        raise UsageError(f"{path} is not a mitmproxy flow file: {e}") from None


def _flow_messages(flow) -> Iterator[tuple[str, Message]]:
    """The messages of a recorded flow: the client's, then the server's the client received."""
    req = flow.request
    if req.method == "POST":
        try:
            body = parse_body(req.get_content(strict=False) or b"")
        except (ParseError, ValueError):
            body = None  # refused at parsing: no rule ever saw it
        for m in body.messages if body else ():
            if m.kind != "invalid":
                yield "client_to_server", m
    else:
        yield "client_to_server", http_request(req.method)
    resp = flow.response
    if resp is None or not resp.raw_content:
        return
    ctype = (resp.headers.get("content-type") or "").split(";")[0].strip().lower()
    chunks: list[str] = []
    if ctype == "application/json":
        chunks = [resp.get_text(strict=False) or ""]
    elif ctype == "text/event-stream":
        parser = SSEParser()
        try:
            events = parser.feed(resp.get_content(strict=False) or b"")
            chunks = [e.data for e in events if e.has_data and e.event == "message"]
        except SSEError:
            chunks = []
    for chunk in chunks:
        try:
            body = parse_body(chunk)
        except ParseError:
            continue
        for m in body.messages:
            if m.kind in ("request", "notification"):
                yield "server_to_client", m


def _recorded_identity(claims: Any) -> Identity:
    """The identity a flow recorded; claims of the wrong type (a damaged file) count as absent."""
    if isinstance(claims, dict):
        claims = {k: v for k, v in claims.items()
                  if k not in ("groups", "scopes") or isinstance(v, (str, list, tuple))}
    return Identity.from_claims(claims)


def _recorded(path: str) -> Iterator[Recorded]:
    for index, flow in enumerate(_read_flows(path), 1):
        if Meta.MCP not in flow.metadata:
            continue
        identity = _recorded_identity(flow.metadata.get(Meta.IDENTITY))
        upstream = flow.metadata.get(Meta.UPSTREAM) or f"{flow.request.host}:{flow.request.port}"
        pending = [d for d in flow.metadata.get(Meta.DECISIONS, []) if d.get("action") != "filter"]
        for direction, m in _flow_messages(flow):
            before = None
            for i, d in enumerate(pending):
                if (d.get("stage") == _STAGE[direction] and d.get("direction") == direction
                        and d.get("id") == m.id and d.get("method") == m.method):
                    before = pending.pop(i)
                    break
            yield Recorded(path, index, identity.sub or "anonymous", direction, m, identity, upstream, before)


def what_if(ruleset_path: str, sessions: list[str], baseline_path: str | None, out) -> int:
    ruleset = _load(ruleset_path)
    baseline = _load(baseline_path) if baseline_path else None
    total = changed = unknown = 0
    for path in sessions:
        for rec in _recorded(path):
            total += 1
            new = ruleset.evaluate(rec.identity, rec.message, rec.direction, rec.upstream)
            if baseline is not None:
                old = baseline.evaluate(rec.identity, rec.message, rec.direction, rec.upstream)
                before = (old.action, old.profile, _verdict(old))
            elif rec.before is not None:
                b = rec.before
                action = b.get("ruled") or b.get("action", "?")  # what the rule said, before the gateway's own checks
                decision = Decision(action, b.get("rule", "?"), b.get("reason", ""), b.get("profile"))
                before = (action, b.get("profile"), _verdict(decision))
            else:
                unknown += 1
                continue
            if before[:2] != (new.action, new.profile):
                changed += 1
                arrow = "->" if rec.direction == "client_to_server" else "<-"
                print(f"{rec.session} flow {rec.flow_index} {rec.who} {arrow} {rec.message.label()}: "
                      f"{before[2]}  =>  {_verdict(new)}", file=out)
    against = f"ruleset {baseline_path}" if baseline is not None else "the recorded decisions"
    note = f", {unknown} without a recorded decision" if unknown else ""
    print(f"{total} messages re-evaluated against {against}: {changed} would change{note}", file=out)
    return 1 if changed else 0


if __name__ == "__main__":
    run(main, "scripts/policy")
