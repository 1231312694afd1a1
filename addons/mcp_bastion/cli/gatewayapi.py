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
import urllib.request
from typing import Any

TOKEN_ENV = "BASTION_APPROVER_TOKEN"
GATEWAY_ENV = "BASTION_GATEWAY"


class CannotRun(Exception):
    """Exit status 2: bad arguments, no token, gateway unreachable, token refused."""


class Refused(Exception):
    """Exit status 1: the gateway understood and said no."""


def common_arguments() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--gateway", help="the gateway's base URL (default: $BASTION_GATEWAY)")
    common.add_argument("--token", help=f"your bearer token (default: ${TOKEN_ENV})")
    common.add_argument("--token-file", help="a file holding your bearer token")
    common.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the gateway")
    return common


def token(args: argparse.Namespace) -> str:
    if args.token:
        return args.token.strip()
    if args.token_file:
        try:
            with open(args.token_file, encoding="utf-8") as f:
                return f.read().strip()
        except OSError as e:
            raise CannotRun(f"cannot read the token file {args.token_file}: {e.strerror or e}") from None
    value = os.environ.get(TOKEN_ENV, "").strip()
    if not value:
        raise CannotRun(f"no token: give --token, --token-file or set {TOKEN_ENV}")
    return value


def call(args: argparse.Namespace, method: str, path: str, body: dict | None = None) -> Any:
    """`method` `path` on the gateway, as the reviewer; the JSON answer. Raises CannotRun or Refused."""
    base = (args.gateway or os.environ.get(GATEWAY_ENV) or "").rstrip("/")
    if not base.startswith(("http://", "https://")):
        raise CannotRun("give the gateway's base URL: --gateway http://HOST:PORT (or set BASTION_GATEWAY)")
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, method=method,
                                 headers={"authorization": f"Bearer {token(args)}", "accept": "application/json",
                                          **({"content-type": "application/json"} if data is not None else {})})
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as resp:
            return json.loads(resp.read() or b"null")
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
        raise CannotRun(f"cannot reach the gateway at {base}: {getattr(e, 'reason', e)}") from None
