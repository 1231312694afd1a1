"""
State: where the gateway keeps what it remembers about callers (see `core.state`).

Option `state_url`: empty (the default) keeps it in this process; `redis://HOST:PORT/DB`
(or `rediss://`, `unix://`) keeps it in Redis, shared by every replica behind a load
balancer, so a caller gets the same answer whichever replica they reach: session
bindings, requestState bindings, task ownership, approvals (released on every replica
through Redis pub/sub) and their grant windows. `state_password_env` names the
environment variable holding Redis's password (kept out of the URL and the config file).

A Redis that cannot be reached does not stop the gateway from starting: what needs the
shared state is refused with a 503 that says so, and the readiness probe (`/readyz`,
check `state`) is 503 with the reason until Redis answers again.
"""

from __future__ import annotations

import logging
import os

from mitmproxy import ctx, exceptions

from mcp_bastion.core.state import Hub
from mcp_bastion.glue.sharedstate import RedisBackend, check_url, shown

logger = logging.getLogger("mcp_bastion")


class State:
    def __init__(self, hub: Hub):
        self.hub = hub
        self._url: str | None = None

    def load(self, loader) -> None:
        loader.add_option(
            "state_url", str, "",
            """
            Where replicas share what the gateway remembers about callers (sessions, tasks,
            requestState bindings, approvals and grants): redis://HOST:PORT/DB, rediss://... (TLS) or
            unix:///path. Empty: in this process only (one gateway). Unreachable Redis: what needs it
            is refused (503) and /readyz says why.
            """,
        )
        loader.add_option(
            "state_password_env", str, "",
            "Name of the environment variable holding Redis's password (instead of putting it in state_url).",
        )

    def configure(self, updated: set[str]) -> None:
        if not updated & {"state_url", "state_password_env", "replica_id"}:
            return
        url = ctx.options.state_url.strip()
        replica = getattr(ctx.options, "replica_id", "") or None
        password = None
        if ctx.options.state_password_env:
            password = os.environ.get(ctx.options.state_password_env)
            if password is None:
                raise exceptions.OptionsError(f"state_password_env: ${ctx.options.state_password_env} is not set")
        if url:
            try:
                check_url(url)
            except ValueError as e:
                raise exceptions.OptionsError(str(e)) from None
        if replica:
            self.hub.replica = replica
        if url == (self._url or "") and "state_password_env" not in updated:
            return
        if self._url is not None and url != self._url:
            raise exceptions.OptionsError("state_url cannot change while the gateway runs: restart it")
        if url:
            backend = RedisBackend(url, self.hub.replica, password=password)
            self.hub.switch(backend)
            self._url = url
            try:
                backend.client.ping()  # not through `call`: an error logged at start would stop mitmdump
            except Exception as e:
                logger.warning("mcp-bastion: shared state in %s is unreachable for now (%s: %s); what needs it "
                               "is refused until it answers", shown(url), type(e).__name__, e)
            else:
                logger.info("mcp-bastion: shared state in %s, replica %s", shown(url), self.hub.replica)
        elif self._url is None:
            self._url = ""

    def running(self) -> None:
        backend = self.hub.backend
        if isinstance(backend, RedisBackend):
            backend.start()

    def done(self) -> None:
        # Last in the bundle: the other parts' `done` (Approvals cancels what it holds) has run.
        self.hub.backend.close()
