"""
Failing closed: an exception in an enforcement step answers the client, never forwards.

mitmproxy's default on an addon exception is to log it and go on with the flow,
which for an enforcement point is a bypass. `fail_closed(stage)` wraps a hook so
that an exception (in the hook, or in a message stage as a `StageError`) is
logged, recorded on the flow (`Meta.ERROR`) and answered with a JSON-RPC error
naming the stage. The Gate is the second line (see addons/gate.py).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable

from mitmproxy import http

from mcp_bastion.core.pipeline import StageError
from mcp_bastion.core.vocab import Action, Meta, StageName
from mcp_bastion.glue import replies

logger = logging.getLogger("mcp_bastion")


def fail_closed(stage: StageName | str) -> Callable:
    """Decorate an addon hook so that an exception denies the flow instead of letting it through.

    Works for sync and async hooks taking one flow argument. The error and the
    stage are recorded in `flow.metadata` and logged with a traceback. A
    A `core.pipeline.StageError` names the stage that failed inside a pipeline run.

    Not for `responseheaders`: a refusal set there is overwritten by the
    upstream's body when mitmproxy reads it; that hook must instead make sure
    the body is buffered (not streamed) so that `response` can withhold it.
    """
    def deco(fn: Callable) -> Callable:
        def handle(flow: http.HTTPFlow, exc: BaseException) -> None:
            refuse_for(flow, stage, exc)

        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def awrapper(self, flow):
                try:
                    return await fn(self, flow)
                except Exception as exc:
                    handle(flow, exc)

            return awrapper

        @functools.wraps(fn)
        def wrapper(self, flow):
            try:
                return fn(self, flow)
            except Exception as exc:
                handle(flow, exc)

        return wrapper

    return deco


def refuse_for(flow: http.HTTPFlow, stage: StageName | str, exc: BaseException) -> None:
    """`stage` raised `exc` on `flow`: log it, record it, and answer the client with an error naming the stage.

    A response whose event stream has begun cannot be answered any more: its stream
    wrapper fails closed on its own; a response whose headers are in but whose body
    is not streamed yet is buffered, so the Gate can withhold it at `response`.
    """
    where = str(getattr(exc, "stage", None) or stage)
    if isinstance(exc, StageError) and exc.__cause__ is not None:
        exc = exc.__cause__  # name what the stage raised, not the wrapper
    logger.error("mcp-bastion: %s failed on %s: %r", where, flow.request.pretty_url, exc, exc_info=exc)
    flow.metadata[Meta.ERROR] = f"{where}: {type(exc).__name__}: {exc}"
    if isinstance(flow.response, http.Response) and callable(flow.response.stream):
        return  # headers already sent; the stream wrapper fails closed on its own
    try:
        replies.refuse(flow, replies.internal_error(where, exc), stage=where, action=Action.ERROR)
    except Exception:  # pragma: no cover - last resort, never let a flow through
        flow.kill()
