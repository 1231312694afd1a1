"""
Talking to a running gateway's own API as a reviewer: the base URL, your own bearer
token, and what an answer means for a command's exit status. Shared by
`scripts/approvals` and `scripts/pins`.
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from mcp_bastion.cli import common

TOKEN_ENV = "BASTION_APPROVER_TOKEN"
GATEWAY_ENV = "BASTION_GATEWAY"


class CannotRun(common.CannotRun):
    """Exit status 2: bad arguments, no token, gateway unreachable, token refused."""


class Refused(Exception):
    """Exit status 1: the gateway understood and said no."""


def common_arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--gateway", help="the gateway's base URL (default: $BASTION_GATEWAY)")
    parser.add_argument("--token", help=f"your bearer token (default: ${TOKEN_ENV})")
    parser.add_argument("--token-file", help="a file holding your bearer token")
    parser.add_argument("--timeout", type=common.positive(float), default=10.0,
                        help="seconds to wait for the gateway (default 10)")
    return parser


def token(args: argparse.Namespace) -> str:
    if args.token:
        return _usable(args.token.strip(), "--token")
    if args.token_file:
        if os.path.isdir(args.token_file):
            raise CannotRun(f"the token file {args.token_file} is a directory")
        try:
            with open(args.token_file, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise CannotRun(f"cannot read the token file {args.token_file}: {e.strerror or e}") from None
        try:
            value = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            raise CannotRun(f"the token file {args.token_file} does not hold a token (not ASCII text)") from None
        if not value:
            raise CannotRun(f"the token file {args.token_file} is empty")
        return _usable(value, f"the token file {args.token_file}")
    value = os.environ.get(TOKEN_ENV, "").strip()
    if not value:
        raise CannotRun(f"no token: give --token, --token-file or set {TOKEN_ENV}")
    return _usable(value, TOKEN_ENV)


def _usable(value: str, source: str) -> str:
    """A bearer token is one line of visible ASCII (RFC 6750): anything else would break the header."""
    if not value.isascii() or any(not c.isprintable() or c.isspace() for c in value):
        raise CannotRun(f"{source} does not hold a bearer token (one word of printable ASCII)")
    return value


def base_url(args: argparse.Namespace) -> str:
    base = (args.gateway or os.environ.get(GATEWAY_ENV) or "").rstrip("/")
    try:
        parts = urllib.parse.urlsplit(base)
        parts.port  # noqa: B018 (raises on a port out of range or not a number)
    except ValueError as e:
        raise CannotRun(f"not a usable gateway URL {base!r}: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CannotRun("give the gateway's base URL: --gateway http://HOST:PORT (or set BASTION_GATEWAY)")
    return base


def call(args: argparse.Namespace, method: str, path: str, body: dict | None = None) -> Any:
    """`method` `path` on the gateway, as the reviewer; the JSON answer. Raises CannotRun or Refused."""
    base = base_url(args)
    data = json.dumps(body).encode() if body is not None else None
    try:
        req = urllib.request.Request(base + path, data=data, method=method,
                                     headers={"authorization": f"Bearer {token(args)}", "accept": "application/json",
                                              **({"content-type": "application/json"} if data is not None else {})})
    except ValueError as e:
        raise CannotRun(f"not a usable gateway URL {base!r}: {e}") from None
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as e:
        try:
            detail = json.loads(e.read() or b"{}")
        except ValueError:
            detail = {}
        message = (detail.get("error") if isinstance(detail, dict) else None) or e.reason
        if isinstance(message, dict):  # a JSON-RPC error from the gateway (a token refused)
            message = message.get("message")
        if e.code in (401, 400) or e.code >= 500:
            raise CannotRun(f"the gateway answered {e.code}: {message}") from None
        raise Refused(str(message)) from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        if isinstance(reason, OSError) and reason.strerror:
            reason = reason.strerror
        raise CannotRun(f"cannot reach the gateway at {base}: {reason}") from None
    try:
        return json.loads(raw or b"null")
    except ValueError:
        raise CannotRun(f"the answer from {base}{path} is not JSON: is {base} the gateway's base URL?") from None


def answer(value: Any, kind: type, what: str) -> Any:
    """`value` if it has the shape a command expects of the gateway's answer, else CannotRun."""
    if not isinstance(value, kind) or (kind is list and not all(isinstance(v, dict) for v in value)):
        raise CannotRun(f"the gateway's answer is not {what}: is this an mcp-bastion gateway of this version?")
    return value
