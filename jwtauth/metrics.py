"""Prometheus metrics: requests and latencies by endpoint (from web.Envelope), audit events, and the state
read at scrape time.

With several workers, `jwtauth serve` sets PROMETHEUS_MULTIPROC_DIR before any worker starts, so that
counters and histograms live in files every worker writes and any worker's scrape adds up.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from jwtauth.service import AuthService

CONTENT_TYPE = CONTENT_TYPE_LATEST
LOGIN_OUTCOMES = {"login_succeeded": "success", "login_failed": "bad_credentials", "login_throttled": "throttled"}


class Metrics:
    """The metrics of one app; `render()` gives the text exposition format."""

    def __init__(self, service: AuthService, paths: set[str]) -> None:
        self.service = service
        self.paths = paths  # anything else is counted as "other", so that scans cannot blow up the label set
        self._registry = CollectorRegistry()  # ours, not the global one: tests run many apps in one process
        self.requests = Counter(
            "jwtauth_http_requests", "HTTP requests by endpoint and status.", ["endpoint", "method", "status"],
            registry=self._registry,
        )  # fmt: skip
        self.latency = Histogram(
            "jwtauth_http_request_duration_seconds", "Time to answer, by endpoint.", ["endpoint"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0), registry=self._registry,
        )  # fmt: skip
        self.logins = Counter("jwtauth_logins", "Logins by outcome.", ["outcome"], registry=self._registry)
        self.reuses = Counter(
            "jwtauth_refresh_reuse_detections", "Refresh tokens reused after the interval: session revoked.",
            registry=self._registry,
        )  # fmt: skip
        self.events = Counter("jwtauth_audit_events", "Audit events by name.", ["event"], registry=self._registry)
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self._event_counters: dict[str, list[Any]] = {}
        self._state = CollectorRegistry()
        self._state.register(_State(self))
        self.live_sessions: int | None = None  # counted in the background (count_sessions), never per scrape

    def count_sessions(self) -> None:
        """Count the live sessions now: the app's maintenance does it every few seconds.

        Raises:
            StoreUnavailableError: the database cannot answer now.
        """
        self.live_sessions = self.service.store.count_live_sessions(self.service.clock())

    def count_event(self, event: str) -> None:
        """Hooked to the service: every audit event."""
        counters = self._event_counters.get(event)
        if counters is None:  # looked up once per event name, as in observe
            counters = [self.events.labels(event)]
            if event in LOGIN_OUTCOMES:
                counters.append(self.logins.labels(LOGIN_OUTCOMES[event]))
            elif event == "refresh_reuse_detected":
                counters.append(self.reuses)
            self._event_counters[event] = counters
        for counter in counters:
            counter.inc()

    def render(self) -> bytes:
        """The text exposition of every metric: all workers' counters, then this moment's state."""
        counters = self._registry
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
            counters = CollectorRegistry()
            MultiProcessCollector(counters)  # type: ignore[no-untyped-call]
        return generate_latest(counters) + generate_latest(self._state)

    def observe(self, path: str, method: str, status: int, seconds: float) -> None:
        """Count and time one HTTP request (web.Envelope calls this)."""
        key = (path if path in self.paths else "other", method, status)
        children = self._children.get(key)
        if children is None:  # labelled children are looked up once: the lookup costs more than the count
            children = self._children[key] = (
                self.requests.labels(key[0], method, str(status)), self.latency.labels(key[0])
            )  # fmt: skip
        children[0].inc()
        children[1].observe(seconds)


class _State(Collector):
    """Gauges of the moment, the same from any worker: sessions (as last counted), the key schedule."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        service, now = self.metrics.service, self.metrics.service.now()
        sessions = GaugeMetricFamily("jwtauth_active_sessions", "Sessions with a live refresh token.")
        if self.metrics.live_sessions is not None:
            sessions.add_metric([], self.metrics.live_sessions)
        current = service.keyset.current
        age = GaugeMetricFamily("jwtauth_signing_key_age_seconds", "Since the current key began to sign.")
        age.add_metric([], now - (current.activated_at or current.created_at))
        rotation = GaugeMetricFamily("jwtauth_key_rotation_due_seconds", "Until the next scheduled rotation.")
        rotation.add_metric([], (current.rotates_at(service.keystore.policy) or now) - now)
        yield from (sessions, age, rotation)
