"""
scripts/approvals: decide the calls an approve rule holds, as a reviewer.

    scripts/approvals list [--json]          the requests you may decide (and your own)
    scripts/approvals show ID                one request, whole
    scripts/approvals approve ID [--reason TEXT]
    scripts/approvals deny ID --reason TEXT

Every command takes --gateway URL (the gateway's base URL, e.g. http://127.0.0.1:8080;
or BASTION_GATEWAY) and your own bearer token: --token, --token-file, or the
BASTION_APPROVER_TOKEN variable. The gateway checks the token with the same
issuers and keys as every MCP request, and refuses a decision on your own
request or by someone outside the rule's approver groups.

Exit status: 0 done, 1 refused (not an approver, own request, already decided,
expired, unknown id), 2 could not run (bad arguments, no token, gateway unreachable,
token refused).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.parse
from typing import Any

from mcp_bastion.cli import gatewayapi
from mcp_bastion.cli.common import ArgumentParser, run
from mcp_bastion.cli.gatewayapi import CannotRun, Refused

API = "/bastion/approvals"


def call(args: argparse.Namespace, method: str, path: str, body: dict | None = None) -> Any:
    return gatewayapi.call(args, method, API + path, body)


def _line(item: dict) -> str:
    args = json.dumps(item.get("arguments"), ensure_ascii=False, sort_keys=True)
    if len(args) > 80:
        args = args[:77] + "..."
    decided = f" by {item['decided_by']}" if item.get("decided_by") else ""
    return (f"{item['id']}  {item['status']:<9}{decided}  {item['requester']}  {item.get('method')} "
            f"{item.get('tool') or ''} {args}  rule {item['rule']}  expires {item['expires']}")


def _id(text: str) -> str:
    """A request id as the gateway hands them out (apr-...): one path segment, quoted."""
    if not text or "/" in text or text in (".", ".."):
        raise CannotRun(f"not a request id: {text!r} (scripts/approvals list shows them)")
    return urllib.parse.quote(text, safe="")


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="scripts/approvals", description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.strip().splitlines()[1:]))
    common = gatewayapi.common_arguments()
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", parents=[common], help="the requests you may decide")
    p.add_argument("--json", action="store_true", help="a JSON array (id, requester, tool, arguments, rule, ...)")
    p.add_argument("--all", action="store_true", help="also the decided and expired ones")
    p = sub.add_parser("show", parents=[common], help="one request, whole")
    p.add_argument("id")
    p = sub.add_parser("approve", parents=[common], help="approve a request")
    p.add_argument("id")
    p.add_argument("--reason", help="why (recorded with the decision)")
    p = sub.add_parser("deny", parents=[common], help="deny a request")
    p.add_argument("id")
    p.add_argument("--reason", required=True, help="why (the caller sees it)")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            items = gatewayapi.answer(call(args, "GET", ""), list, "a list of requests")
            if not args.all:
                items = [i for i in items if i["status"] == "pending"]
            if args.json:
                print(json.dumps(items, indent=2, ensure_ascii=False))
            else:
                print("\n".join(_line(i) for i in items) if items else "no pending requests")
        elif args.command == "show":
            print(json.dumps(call(args, "GET", f"/{_id(args.id)}"), indent=2, ensure_ascii=False))
        else:
            item = gatewayapi.answer(call(args, "POST", f"/{_id(args.id)}/{args.command}",
                                          {"reason": args.reason} if args.reason else {}), dict, "a request")
            print(f"{item['id']} {item['status']} ({item.get('method')} {item.get('tool') or ''} "
                  f"by {item['requester']}, rule {item['rule']})")
        return 0
    except Refused as e:
        print(f"scripts/approvals: refused: {e}", file=sys.stderr)
        return 1
    except CannotRun as e:
        print(f"scripts/approvals: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    run(main, "scripts/approvals")
