"""
Tracing: an OpenTelemetry span per MCP message, with who asked and what was decided.

With `otel_endpoint` set (an OTLP/HTTP traces URL, e.g.
`http://127.0.0.1:4318/v1/traces`), each finished flow becomes one span per
message decision (`mcp <method> <target>`), timed from the request's arrival to
the end of its answer, with attributes: `mcp.method`, `mcp.target`,
`mcp.direction`, `mcp.action`, `mcp.rule`, `mcp.upstream`, `mcp.session`,
`enduser.id`, `enduser.groups`, `http.response.status_code`. A denial or a
gateway error sets the span's status to error. Spans are batched and sent off
the event loop by the SDK's `BatchSpanProcessor`; an exporter that fails is
the SDK's to log, never in a flow's way.

`Tracing(exporter=...)` takes any span exporter instead (the tests use the
SDK's in-memory one).
"""

from __future__ import annotations

import logging
from typing import Any

from mitmproxy import ctx, exceptions, http

from mcp_bastion.glue.decisions import TARGETS, lines

logger = logging.getLogger("mcp_bastion")


class Tracing:
    observes = True  # reads finished flows, never changes them (glue.dispatch: a failure is only logged)

    def __init__(self, exporter: Any = None):
        self._exporter = exporter
        self.provider: Any = None
        self.tracer: Any = None
        self._seen: set[str] = set()
        if exporter is not None:
            self._start(exporter, simple=True)

    def load(self, loader) -> None:
        loader.add_option("otel_endpoint", str, "",
                          "OTLP/HTTP traces URL (e.g. http://127.0.0.1:4318/v1/traces): one span per MCP message "
                          "with identity and decision attributes. Empty: no tracing.")
        loader.add_option("otel_service_name", str, "mcp-bastion", "The service.name of the spans.")

    def configure(self, updated: set[str]) -> None:
        if self._exporter is not None or not ({"otel_endpoint", "otel_service_name"} & updated):
            return
        url = ctx.options.otel_endpoint.strip()
        self._stop()
        if not url:
            return
        if not url.startswith(("http://", "https://")):
            raise exceptions.OptionsError(f"otel_endpoint must be an http(s) URL: {url!r}")
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        self._start(OTLPSpanExporter(endpoint=url, timeout=5), simple=False)

    def _start(self, exporter: Any, simple: bool) -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        name = "mcp-bastion"
        try:
            name = ctx.options.otel_service_name or name
        except (AttributeError, KeyError):
            pass
        self.provider = TracerProvider(resource=Resource.create({"service.name": name}))
        self.provider.add_span_processor(SimpleSpanProcessor(exporter) if simple else BatchSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("mcp_bastion")

    def _stop(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()
        self.provider = self.tracer = None

    def done(self) -> None:
        if self.provider is not None:
            self.provider.force_flush(5000)
            self._stop()

    def response(self, flow: http.HTTPFlow) -> None:
        self._spans(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._spans(flow)

    def _spans(self, flow: http.HTTPFlow) -> None:
        if self.tracer is None or flow.id in self._seen:
            return
        self._seen.add(flow.id)
        if len(self._seen) > 10_000:
            self._seen.clear()
        try:
            from opentelemetry.trace import Status, StatusCode

            start = int((flow.request.timestamp_start or 0) * 1e9) or None
            for entry in lines(flow):
                target = next((entry[k] for k in TARGETS if entry.get(k)), None)
                name = f"mcp {entry.get('method') or entry.get('kind') or '?'}" + (f" {target}" if target else "")
                attributes = {k: v for k, v in {
                    "mcp.method": entry.get("method"), "mcp.target": target, "mcp.direction": entry.get("direction"),
                    "mcp.action": entry.get("action"), "mcp.rule": entry.get("rule"),
                    "mcp.reason": str(entry["reason"])[:500] if entry.get("reason") else None,
                    "mcp.upstream": entry.get("upstream"), "mcp.session": entry.get("session"),
                    "mcp.id": str(entry["id"]) if entry.get("id") is not None else None,
                    "enduser.id": entry.get("subject") or entry.get("client_id"),
                    "enduser.groups": list(entry.get("groups") or ()) or None,
                    "http.response.status_code": entry.get("status"),
                }.items() if v is not None}
                span = self.tracer.start_span(name[:200], start_time=start, attributes=attributes)
                if entry.get("action") in ("deny", "error") or entry.get("error"):
                    span.set_status(Status(StatusCode.ERROR, str(entry.get("reason") or entry.get("error"))[:200]))
                span.end()
        except Exception as e:  # tracing never stands in a flow's way
            logger.error("mcp-bastion: tracing could not record %s: %r", flow.request.pretty_url, e)
