"""
UpstreamToken: the upstream's own credential, set only on requests that are forwarded.

No token passthrough: Auth removes the client's `Authorization` header; this
addon, placed after the Gate, sets the upstream's own credential (from an
environment variable or a file, re-read when it changes), lists its header name
in `flow.metadata[Meta.SECRET_HEADERS]` for the Recorder, and takes it off the
flow again once the request has been sent.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mitmproxy import ctx, exceptions, http

from mcp_bastion.core.vocab import Meta, StageName
from mcp_bastion.glue import flowstate as fs
from mcp_bastion.glue.failclosed import fail_closed

_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


class UpstreamCredential:
    """The upstream's own credential: a header set on every forwarded request.

    The secret comes from an environment variable (read at start) or a file
    (read again whenever it changes, so it can be rotated in place).
    """

    def __init__(self, header: str, scheme: str, env: str = "", path: str = ""):
        self.header = header.lower()
        self.scheme = scheme
        self.path = Path(path) if path else None
        self._stamp: tuple[int, int] | None = None
        self._secret = os.environ.get(env, "").strip() if env else None
        if env and not self._secret:
            raise ValueError(f"environment variable {env} is not set or empty")
        if self.path is not None:
            self._read_file()

    def _read_file(self) -> None:
        assert self.path is not None
        st = self.path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        if stamp != self._stamp:
            secret = self.path.read_text(encoding="utf-8").strip()
            if not secret:
                raise ValueError(f"upstream credential file {self.path} is empty")
            self._secret, self._stamp = secret, stamp

    def value(self) -> str | None:
        """The header value to send, or None when no credential is configured."""
        if self.path is not None:
            self._read_file()
        if self._secret is None:
            return None
        if "\r" in self._secret or "\n" in self._secret:
            raise ValueError("the upstream credential contains a line break")
        return f"{self.scheme} {self._secret}" if self.scheme else self._secret


class UpstreamToken:
    """Sets the upstream's own credential on MCP requests that are forwarded.

    Placed after the Gate, so a refused request never carries it; removed from
    the flow once the request is sent (`responseheaders`, or `error`), so
    mitmweb and the console never show it. Any value the client sent in the
    same header is replaced.
    """

    def __init__(self) -> None:
        self.credential = UpstreamCredential("authorization", "Bearer")

    def load(self, loader) -> None:
        loader.add_option(
            "upstream_token_env", str, "",
            "Environment variable holding the upstream's own credential (sent instead of the client's token).",
        )
        loader.add_option(
            "upstream_token_file", str, "",
            "File holding the upstream's own credential; read again when it changes.",
        )
        loader.add_option(
            "upstream_token_header", str, "authorization", "Request header that carries the upstream credential."
        )
        loader.add_option(
            "upstream_token_scheme", str, "Bearer",
            "Prefix of the upstream credential in its header (empty: the bare secret).",
        )

    def configure(self, updated: set[str]) -> None:
        if not any(name.startswith("upstream_token_") for name in updated):
            return
        opts = ctx.options
        if not _HEADER_NAME.fullmatch(opts.upstream_token_header):
            raise exceptions.OptionsError(f"upstream_token_header {opts.upstream_token_header!r} is not a header name")
        if opts.upstream_token_env and opts.upstream_token_file:
            raise exceptions.OptionsError("set upstream_token_env or upstream_token_file, not both")
        try:
            credential = UpstreamCredential(
                opts.upstream_token_header, opts.upstream_token_scheme.strip(),
                opts.upstream_token_env, opts.upstream_token_file,
            )
            credential.value()
        except (OSError, ValueError) as e:
            raise exceptions.OptionsError(f"upstream credential: {e}") from None
        self.credential = credential

    @fail_closed(StageName.UPSTREAM_TOKEN)
    def request(self, flow: http.HTTPFlow) -> None:
        if flow.response or flow.error or not flow.live or not fs.is_mcp(flow):
            return
        value = self.credential.value()
        if value is not None:
            flow.request.headers[self.credential.header] = value
            flow.metadata[Meta.SECRET_HEADERS] = [self.credential.header]
            fs.set_upstream_credential(flow, self.credential.header, value)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        for name in flow.metadata.get(Meta.SECRET_HEADERS, ()):
            if name in flow.request.headers:
                del flow.request.headers[name]

    error = responseheaders
