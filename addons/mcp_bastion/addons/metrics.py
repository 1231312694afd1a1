"""
Metrics: the admin listener, with Prometheus metrics and health probes.

Option `admin_listen` (`HOST:PORT`, off by default) starts a small HTTP server,
apart from the MCP listener (which answers none of this):

- `GET /metrics`: the Prometheus text format (`prometheus_client`): decisions
  by action, rule and group; request latency; SSE events; masked values by
  detector; approvals pending and decided; audit and recording write failures;
  identity-provider key fetches and the age of the keys;
- `GET /healthz`: 200 while the process serves (`{"status": "ok"}`);
- `GET /readyz`: 200 when the ruleset is loaded, signing keys are at hand
  (identity on), recording and the audit log can write, and the state store
  answers (Redis, with `state_url`); else 503, with each check and why in the
  JSON body.

What it counts is read off each flow when it ends (its decisions), or asked of
the other parts at scrape time (`Sources`, wired by `bundle()`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mitmproxy import ctx, exceptions, http
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from mcp_bastion.core.vocab import Meta
from mcp_bastion.glue import flowstate as fs

logger = logging.getLogger("mcp_bastion")

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
MAX_RULES = 500  # distinct rule label values (beyond: "other"), so a ruleset cannot blow up the series
MAX_METHODS = 100  # distinct method label values (beyond: "other"): clients choose method names


@dataclass
class Sources:
    """What the metrics and probes ask the other addons at scrape time (wired by `bundle()`)."""

    ruleset: Callable[[], Any] | None = None  # the ruleset in force (raises or None when none is loaded)
    approvals: Callable[[], list[Any]] | None = None  # every approval the store holds
    writers: list[Any] = field(default_factory=list)  # WriteHealth of the recorder and the audit log
    issuers: Callable[[], dict[str, dict[str, Any]] | None] | None = None  # verifier status per issuer, or None
    timings: Callable[[], dict[str, dict[str, tuple[int, float]]] | None] | None = None  # Timing.clocks
    state: Callable[[], tuple[bool, str]] | None = None  # whether the (shared) state answers, and what it is


class _Scraped:
    """Gauges read at scrape time."""

    def __init__(self, sources: Sources):
        self.sources = sources

    def collect(self) -> list[Metric]:
        out: list[Metric] = []
        pending = GaugeMetricFamily("bastion_approvals_pending", "Calls waiting for a person's approval now")
        n = 0
        if self.sources.approvals is not None:
            with contextlib.suppress(Exception):
                n = sum(1 for a in self.sources.approvals() if getattr(a, "status", None) == "pending")
        pending.add_metric([], n)
        out.append(pending)
        up = GaugeMetricFamily("bastion_writer_ok", "1 when the writer (recording, audit) can write", labels=["writer"])
        failures = CounterMetricFamily("bastion_write_failures", "Failed writes of the recording or the audit log",
                                       labels=["writer"])
        for w in self.sources.writers:
            up.add_metric([w.reason], 0 if w.failure else 1)
            failures.add_metric([w.reason], getattr(w, "failures", 0))
        out += [up, failures]
        issuers = self.sources.issuers() if self.sources.issuers is not None else None
        keys = GaugeMetricFamily("bastion_idp_keys", "Signing keys held per issuer", labels=["issuer"])
        age = GaugeMetricFamily("bastion_idp_keys_age_seconds", "Age of the signing keys per issuer", labels=["issuer"])
        fetches = GaugeMetricFamily("bastion_idp_key_fetches", "Key fetches per issuer and outcome (since start)",
                                    labels=["issuer", "outcome"])
        for issuer, s in (issuers or {}).items():
            keys.add_metric([issuer], s.get("keys") or 0)
            if s.get("age") is not None:
                age.add_metric([issuer], s["age"])
            fetches.add_metric([issuer, "ok"], s.get("fetches", 0))
            fetches.add_metric([issuer, "error"], s.get("fetch_errors", 0))
        out += [keys, age, fetches]
        clocks = self.sources.timings() if self.sources.timings is not None else None
        if clocks is not None:  # stage_timing on
            for kind, count in (("stage", "checks"), ("hook", "calls")):
                cpu = CounterMetricFamily(f"bastion_{kind}_cpu_seconds", f"CPU time per {kind} (stage_timing)",
                                          labels=[kind])
                n = CounterMetricFamily(f"bastion_{kind}_{count}", f"{count.capitalize()} per {kind} "
                                        "(stage_timing)", labels=[kind])
                for name, (calls, seconds) in sorted(clocks[kind].items()):
                    cpu.add_metric([name], seconds)
                    n.add_metric([name], calls)
                out += [cpu, n]
        return out


class Metrics:
    observes = True  # reads finished flows, never changes them (glue.dispatch: a failure is only logged)

    def __init__(self, sources: Sources | None = None):
        self.sources = sources or Sources()
        self.registry = CollectorRegistry()
        self.decisions = Counter("bastion_decisions", "Message decisions by action, rule and caller group",
                                 ["action", "rule", "group"], registry=self.registry)
        self.latency = Histogram("bastion_request_duration_seconds", "Time from request to the end of its answer",
                                 ["method", "outcome"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.events = Counter("bastion_sse_events", "SSE events passed through the stages", registry=self.registry)
        self.masked = Counter("bastion_masked_values", "Values masked, by detector", ["detector"],
                              registry=self.registry)
        self.approvals_decided = Counter("bastion_approvals_decided", "Approvals decided, by outcome", ["status"],
                                         registry=self.registry)
        self.registry.register(_Scraped(self.sources))
        self._rules: set[str] = set()
        self._seen: set[str] = set()
        self._children: dict[tuple, Any] = {}
        self._methods: set[str] = set()
        self._server: asyncio.base_events.Server | None = None
        self._listen: tuple[str, int] | None = None

    def load(self, loader) -> None:
        loader.add_option("admin_listen", str, "",
                          "HOST:PORT of the admin listener (GET /metrics in the Prometheus format, /healthz, "
                          "/readyz), apart from the MCP listener, e.g. 127.0.0.1:9090. Empty: off.")

    def configure(self, updated: set[str]) -> None:
        if "admin_listen" in updated:
            value = ctx.options.admin_listen.strip()
            if not value:
                self._listen = None
                return
            host, sep, port = value.rpartition(":")
            if not sep or not port.isdigit() or not 0 < int(port) < 65536:
                raise exceptions.OptionsError(f"admin_listen must be HOST:PORT, e.g. 127.0.0.1:9090: {value!r}")
            self._listen = (host.strip("[]") or "127.0.0.1", int(port))

    async def running(self) -> None:
        if self._listen is None or self._server is not None:
            return
        host, port = self._listen
        try:
            self._server = await asyncio.start_server(self._serve, host, port, limit=16 * 1024)
        except OSError as e:
            logger.error("mcp-bastion: admin listener %s:%s could not start: %s", host, port, e)
            raise
        logger.info("mcp-bastion: admin listener on http://%s:%s (/metrics, /healthz, /readyz)", host, port)

    def done(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    # --- counting ---------------------------------------------------------------------

    def response(self, flow: http.HTTPFlow) -> None:
        self._count(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._count(flow)

    def _count(self, flow: http.HTTPFlow) -> None:
        if flow.id in self._seen or not (fs.is_mcp(flow) or flow.metadata.get(Meta.DECISIONS)):
            return
        self._seen.add(flow.id)
        if len(self._seen) > 10_000:
            self._seen.clear()
        try:
            ident = flow.metadata.get(Meta.IDENTITY) or {}
            groups = [g for g in (ident.get("groups") or ()) if isinstance(g, str)][:10] or ["none"]
            decided = False
            for d in flow.metadata.get(Meta.DECISIONS) or ():
                if d.get("stage") == "transport":
                    continue
                rule = self._rule(d.get("rule"))
                for g in groups:
                    self._child(self.decisions, d.get("action") or "forward", rule, g).inc()
                for m in d.get("masked") or ():
                    self.masked.labels(str(m.get("detector"))).inc(int(m.get("count") or 0))
                decided = decided or d.get("action") in ("deny", "approve", "error")
            approval = flow.metadata.get(Meta.APPROVAL) or {}
            if approval.get("decided_by") or approval.get("status") in ("denied", "expired", "cancelled"):
                self.approvals_decided.labels(str(approval.get("status"))).inc()
            state = fs.mcp_state(flow)
            self.events.inc(len(state.get("events") or ()))
            method = next((s.get("method") for s in state.get("request") or () if isinstance(s, dict)), None)
            elapsed = fs.elapsed_ms(flow)
            if elapsed is not None:
                outcome = "error" if flow.error else "refused" if decided or fs.refused(flow) else "ok"
                self._child(self.latency, self._method(method or flow.request.method), outcome).observe(
                    elapsed / 1000)
        except Exception as e:  # metrics never stand in a flow's way
            logger.error("mcp-bastion: metrics could not count %s: %r", flow.request.pretty_url, e)

    def _child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, remembered (prometheus_client takes a lock and builds a key each time;
        the series exist for as long as the registry anyway)."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _method(self, method: Any) -> str:
        return _bounded(str(method)[:64], self._methods, MAX_METHODS)  # clients name their methods

    def _rule(self, rule: Any) -> str:
        return _bounded(str(rule)[:100], self._rules, MAX_RULES) if rule else ""

    # --- probes -----------------------------------------------------------------------

    def ready(self) -> tuple[bool, dict[str, Any]]:
        checks: dict[str, Any] = {}
        try:
            loaded = self.sources.ruleset() if self.sources.ruleset is not None else None
            checks["ruleset"] = {"ok": loaded is not None}
            if loaded is not None:
                checks["ruleset"]["source"] = getattr(loaded, "source", None)
        except Exception as e:
            checks["ruleset"] = {"ok": False, "why": str(e)[:200]}
        issuers = self.sources.issuers() if self.sources.issuers is not None else None
        if issuers is not None:  # identity is on
            bad = {i: s.get("error") or "no keys yet" for i, s in issuers.items() if not s.get("keys")}
            checks["keys"] = {"ok": bool(issuers) and not bad, **({"why": bad} if bad else {})}
        for w in self.sources.writers:
            if w.required:
                checks[w.reason] = {"ok": not w.failure, **({"why": w.failure} if w.failure else {})}
        if self.sources.state is not None:
            try:
                ok, why = self.sources.state()
            except Exception as e:
                ok, why = False, f"{type(e).__name__}: {e}"[:300]
            checks["state"] = {"ok": ok, ("store" if ok else "why"): why}
        return all(c["ok"] for c in checks.values()), checks

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            line = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            method, path = (line[0], line[1].split("?", 1)[0]) if len(line) >= 2 else ("", "")
            if method not in ("GET", "HEAD"):
                status, ctype, body = 405, "application/json", b'{"error":"GET only"}'
            elif path == "/metrics":
                status, ctype, body = 200, "text/plain; version=0.0.4; charset=utf-8", generate_latest(self.registry)
            elif path == "/healthz":
                status, ctype, body = 200, "application/json", b'{"status":"ok"}'
            elif path == "/readyz":
                ok, checks = self.ready()
                status, ctype = (200 if ok else 503), "application/json"
                body = json.dumps({"status": "ready" if ok else "not ready", "checks": checks}).encode()
            else:
                status, ctype, body = 404, "application/json", b'{"error":"not found: /metrics, /healthz, /readyz"}'
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}[status]
            writer.write(f"HTTP/1.1 {status} {reason}\r\ncontent-type: {ctype}\r\ncontent-length: {len(body)}\r\n"
                         f"cache-control: no-store\r\nconnection: close\r\n\r\n".encode() + (b"" if method == "HEAD"
                                                                                          else body))
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        except Exception as e:
            logger.error("mcp-bastion: admin listener failed: %r", e, exc_info=e)
        finally:
            with contextlib.suppress(Exception):
                writer.close()


def _bounded(value: str, seen: set[str], most: int) -> str:
    """`value` as a label value, or "other" once `most` distinct ones are in use (each label value is a
    series kept for the life of the process: what a client or a ruleset names must not grow it without end)."""
    if value not in seen:
        if len(seen) >= most:
            return "other"
        seen.add(value)
    return value
