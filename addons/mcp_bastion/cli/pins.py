"""
scripts/pins: see and accept the tool, prompt and template definitions a gateway pinned.

    scripts/pins list [--json]        every pin; a changed one says so
    scripts/pins diff ITEM            what changed since ITEM was pinned, as a diff
    scripts/pins accept ITEM          the changed definition becomes the pin (ITEM works again)
    scripts/pins forget ITEM          drop the pin (the next definition seen is pinned afresh)

ITEM is a tool's (or prompt's, or template's) name; --upstream HOST:PORT and
--kind tool|prompt|template say which when several share it.

Against a running gateway: --gateway URL (or BASTION_GATEWAY) and your own
bearer token (--token, --token-file or BASTION_APPROVER_TOKEN); the gateway lets
members of its pin_reviewers groups through. On the store file of a stopped
gateway: --store FILE (the gateway's pin_store), with --as NAME for the record.

Exit status: 0 done, 1 refused or nothing to accept (not a reviewer, unknown
item, nothing changed), 2 could not run (bad arguments, no token, gateway
unreachable, token refused, store unreadable or in use).
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import sys
import urllib.parse
from typing import Any

from mcp_bastion.cli import gatewayapi
from mcp_bastion.cli.common import ArgumentParser, run
from mcp_bastion.cli.gatewayapi import CannotRun, Refused

API = "/bastion/pins"


def _line(pin: dict[str, Any]) -> str:
    status = pin.get("status", "pinned")
    flags = sorted({f["check"] for f in pin.get("findings") or []} | {f["check"] for f in pin.get("changed_findings")
                                                                       or []})
    extra = f"  findings: {', '.join(flags)}" if flags else ""
    by = f"  accepted by {pin['accepted_by']}" if pin.get("accepted_by") else ""
    return f"{status:<8} {pin['kind']:<8} {pin['name']}  ({pin['upstream']})  {pin['digest'][:19]}{by}{extra}"


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="scripts/pins", description=__doc__.strip().splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.strip().splitlines()[1:]))
    common = gatewayapi.common_arguments()
    common.add_argument("--store", help="work on this pin store file of a stopped gateway instead")
    common.add_argument("--as", dest="as_name", help="with --store: the name recorded as having accepted")
    which = argparse.ArgumentParser(add_help=False)
    which.add_argument("item", help="the tool's, prompt's or template's name")
    which.add_argument("--upstream", help="HOST:PORT of the upstream, when several have ITEM")
    which.add_argument("--kind", choices=("tool", "prompt", "template"), help="when ITEM names several kinds")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("list", parents=[common], help="every pin")
    p.add_argument("--json", action="store_true", help="a JSON array of pins")
    sub.add_parser("diff", parents=[common, which], help="what changed since ITEM was pinned")
    p = sub.add_parser("accept", parents=[common, which], help="accept ITEM's changed definition")
    p.add_argument("--digest", help="accept only if the change is still this one (the digest `diff` printed)")
    sub.add_parser("forget", parents=[common, which], help="forget ITEM's pin")
    args = parser.parse_args(argv)
    try:
        if args.store:
            return _offline(args)
        return _online(args)
    except Refused as e:
        print(f"scripts/pins: refused: {e}", file=sys.stderr)
        return 1
    except CannotRun as e:
        print(f"scripts/pins: {e}", file=sys.stderr)
        return 2


def _online(args: argparse.Namespace) -> int:
    if args.command == "list":
        pins = gatewayapi.answer(gatewayapi.call(args, "GET", API), list, "a list of pins")
        _print_list(args, pins)
        return 0
    query = {k: v for k, v in (("name", args.item), ("upstream", args.upstream), ("kind", args.kind)) if v}
    if args.command == "diff":
        pins = gatewayapi.answer(gatewayapi.call(args, "GET", API + "?" + urllib.parse.urlencode(query)), list,
                                 "a list of pins")
        return _print_diff(args, pins)
    if args.command == "accept" and args.digest:
        query["digest"] = args.digest
    pin = gatewayapi.answer(gatewayapi.call(args, "POST", f"{API}/{args.command}", query), dict, "a pin")
    print(f"{args.command}ed: {_line(pin)}" if args.command == "accept" else f"forgot: {_line(pin)}")
    return 0


def _offline(args: argparse.Namespace) -> int:
    from mcp_bastion.core.pins import PinError, PinStore, diff

    if os.path.isdir(args.store):
        raise CannotRun(f"pin store {args.store} is a directory (give the gateway's pin_store file)")
    if not os.path.exists(args.store):
        raise CannotRun(f"pin store {args.store} does not exist (give the gateway's pin_store file)")
    try:
        store = PinStore(args.store)
        if args.command != "list" and args.command != "diff":
            store.lock()
    except (PinError, OSError) as e:
        raise CannotRun(str(e)) from None
    try:
        if args.command == "list":
            _print_list(args, [p.view() for p in store.all()])
            return 0
        pins = store.find(args.item, args.kind, args.upstream)
        if args.command == "diff":
            return _print_diff(args, [{**p.view(), "diff": diff(p)} for p in pins])
        try:
            if args.command == "accept":
                pin = store.accept(pins, args.as_name or f"{getpass.getuser()} (scripts/pins --store)",
                                   expect=args.digest or None)
            else:
                pin = store.forget(pins)
        except PinError as e:
            raise Refused(str(e)) from None
        print(f"{args.command}ed: {_line(pin.view())}" if args.command == "accept" else f"forgot: {_line(pin.view())}")
        return 0
    finally:
        store.unlock()


def _print_list(args: argparse.Namespace, pins: list[dict[str, Any]]) -> None:
    if args.json:
        print(json.dumps(pins, indent=2, ensure_ascii=False))
    else:
        print("\n".join(_line(p) for p in pins) if pins else "nothing is pinned")


def _print_diff(args: argparse.Namespace, pins: list[dict[str, Any]]) -> int:
    if not pins:
        raise Refused(f"nothing named {args.item} is pinned")
    if len(pins) > 1:
        where = ", ".join(f"{p['kind']} of {p['upstream']}" for p in pins)
        raise Refused(f"{args.item} is pinned several times ({where}): say which with --upstream or --kind")
    pin = pins[0]
    if not pin.get("diff"):
        print(f"{pin['kind']} {pin['name']} ({pin['upstream']}) has not changed since it was pinned")
        return 1
    print(pin["diff"])
    print(f"(to accept exactly this change: scripts/pins accept {pin['name']} --digest {pin['changed']['digest']})")
    for f in pin.get("changed_findings") or []:
        print(f"finding in the new definition: {f['check']} at {f['where']}: {f['detail']}")
    return 0


if __name__ == "__main__":
    run(main, "scripts/pins")
