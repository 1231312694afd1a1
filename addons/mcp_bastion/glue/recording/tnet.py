"""
A flow's state encoded as mitmproxy's tnetstring, in pieces.

`tnet_parts` gives the same bytes as `mitmproxy.io.tnetstring.dumps`, about
twice as fast on a flow's state, with large bodies passed on as they are and a
spooled event-stream body (`Blob`) left on disk until it is written.
`flow_state` is `flow.get_state()` with each connection's state encoded once
(`ConnectionStates`) and reused while the connection is unchanged.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Any

from mitmproxy import connection, http, version
from mitmproxy.io import tnetstring

from mcp_bastion.glue.recording.spool import Spool


class Blob:
    """A body written from a spool: the tnetstring needs only its length up front."""

    def __init__(self, spool: Spool):
        self.spool = spool
        self.size = spool.stored


class Raw:
    """A value already encoded as a tnetstring."""

    __slots__ = ("data",)

    def __init__(self, data: bytes):
        self.data = data


_LARGE = 4096  # bytes at least this long are passed on as their own piece rather than copied into one


_KEY_PIECES: dict[str, bytes] = {}  # encoded dict keys: a flow's state uses the same few dozen names again and again
_KEY_PIECES_MAX = 1024  # bounded: keys that come from data cannot fill memory
_KEY_PIECE_BYTES = 64


def _key_piece(key: Any) -> bytes:
    out: list = []
    _encode(key, out)
    piece = b"".join(out)
    if type(key) is str and len(piece) <= _KEY_PIECE_BYTES and len(_KEY_PIECES) < _KEY_PIECES_MAX:
        _KEY_PIECES[key] = piece
    return piece


def tnet_parts(value: Any) -> tuple[list[bytes | Blob], int]:
    """Encode `value` as tnetstring pieces and their total size; a `Blob` stays a placeholder.

    The pieces joined are byte for byte `mitmproxy.io.tnetstring.dumps(value)`
    (which writes a dict's items in reverse order); a `Blob` in their place is
    its spool's bytes. About twice as fast as `dumps` on a flow's state, and a
    large body is passed on as it is rather than copied into a piece.
    """
    out: list[bytes | Blob] = []
    size = _encode(value, out)
    return out, size


def _encode(value: Any, out: list) -> int:
    kind = type(value)
    if kind is str:
        data = value.encode("utf8")
        piece = b"%d:%s;" % (len(data), data)
    elif kind is bytes:
        if len(value) >= _LARGE:
            head = b"%d:" % len(value)
            out += (head, value, b",")
            return len(head) + len(value) + 1
        piece = b"%d:%s," % (len(value), value)
    elif kind is dict:
        at = len(out)
        out.append(b"")
        n = 0
        for k, v in reversed(value.items()):
            key = _KEY_PIECES.get(k) or _key_piece(k)
            out.append(key)
            n += len(key) + _encode(v, out)
        out[at] = head = b"%d:" % n
        out.append(b"}")
        return len(head) + n + 1
    elif kind is tuple or kind is list:
        at = len(out)
        out.append(b"")
        n = 0
        for v in value:
            n += _encode(v, out)
        out[at] = head = b"%d:" % n
        out.append(b"]")
        return len(head) + n + 1
    elif value is None:
        piece = b"0:~"
    elif value is True:
        piece = b"4:true!"
    elif value is False:
        piece = b"5:false!"
    elif kind is int:
        data = b"%d" % value
        piece = b"%d:%s#" % (len(data), data)
    elif kind is float:
        data = repr(value).encode()
        piece = b"%d:%s^" % (len(data), data)
    elif kind is Raw:
        out.append(value.data)
        return len(value.data)
    elif kind is Blob:
        head = b"%d:" % value.size
        out += (head, value, b",")
        return len(head) + value.size + 1
    else:
        piece = tnetstring.dumps(value)  # subclasses of the types above: mitmproxy's own rules (or its error)
    out.append(piece)
    return len(piece)


# --- flow state ---------------------------------------------------------------------


@functools.cache
def _serialised_fields(cls: type) -> tuple[str, ...]:
    """The fields a connection class's `get_state()` writes (mitmproxy skips `serialize=False`)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("serialize", True))


class ConnectionStates:
    """Each connection's state, encoded once and reused while none of its fields changed.

    The flows of a keep-alive connection share their client and server
    connection, and rebuilding both states (`Connection.get_state()`) for
    every flow is most of what `flow.get_state()` costs. A connection's fields
    hold immutable values or lists of them (mitmproxy's `Client`/`Server`), so
    a tuple of their values, lists as tuples, tells whether it changed.
    """

    def __init__(self) -> None:
        self._memo: weakref.WeakKeyDictionary[connection.Connection, tuple[tuple, Raw]] = weakref.WeakKeyDictionary()

    def encoded(self, conn: connection.Connection) -> Raw:
        values = tuple(tuple(v) if isinstance(v, list) else v
                       for v in (getattr(conn, name) for name in _serialised_fields(type(conn))))
        known = self._memo.get(conn)
        if known is not None and known[0] == values:
            return known[1]
        raw = Raw(b"".join(tnet_parts(conn.get_state())[0]))  # type: ignore[arg-type]  # no Blob in a connection
        self._memo[conn] = (values, raw)
        return raw


def flow_state(flow: http.HTTPFlow, conns: ConnectionStates) -> dict[str, Any]:
    """`flow.get_state()`, with the connections as encoded `Raw` values and the metadata as a shallow copy.

    Encoded by `tnet_parts`, it gives the same bytes as `flow.get_state()`
    (the same keys in the same order: `Flow.get_state` then `HTTPFlow.get_state`;
    a test holds the two together). A flow with a backup (edited in mitmweb or
    the console) takes mitmproxy's own path, which decides whether to keep the
    backup. Only the returned containers may be changed, not the values they
    share with the live flow.
    """
    if flow._backup is not None:  # no public accessor; set only by flow.backup()
        return flow.get_state()
    return {
        "version": version.FLOW_FORMAT_VERSION,
        "type": flow.type,
        "id": flow.id,
        "error": flow.error.get_state() if flow.error else None,
        "client_conn": conns.encoded(flow.client_conn),
        "server_conn": conns.encoded(flow.server_conn),
        "intercepted": flow.intercepted,
        "is_replay": flow.is_replay,
        "marked": flow.marked,
        "metadata": dict(flow.metadata),
        "comment": flow.comment,
        "timestamp_created": flow.timestamp_created,
        "backup": None,
        "request": flow.request.get_state(),
        "response": flow.response.get_state() if flow.response else None,
        "websocket": flow.websocket.get_state() if flow.websocket else None,
    }
