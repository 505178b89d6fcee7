"""Prometheus metrics, one registry per app (never the process-global default), exposed at ``/metrics``.

Labels are bounded: HTTP method, the route *template* (``/api/users/{user_id}``, never a concrete id, so no
tenant identifier becomes a label and cardinality stays fixed), status code, and the provisioning operation.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
UNMATCHED = "<unmatched>"


@dataclass(frozen=True)
class ApiMetrics:
    registry: CollectorRegistry
    requests: Counter
    latency: Histogram
    provisioning: Counter
    provisioning_seconds: Histogram

    @classmethod
    def create(cls) -> ApiMetrics:
        registry = CollectorRegistry(auto_describe=True)
        return cls(
            registry=registry,
            requests=Counter("agentpg_http_requests", "HTTP requests answered, by route template and status.",
                             ["method", "route", "status"], registry=registry),
            latency=Histogram("agentpg_http_request_duration_seconds",
                              "Time to answer an HTTP request (to the last byte for streamed exports).",
                              ["method", "route"], registry=registry,
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)),
            provisioning=Counter("agentpg_provisioning_operations",
                                 "Provisioning operations run through the API, by outcome (ok | error).",
                                 ["operation", "outcome"], registry=registry),
            provisioning_seconds=Histogram("agentpg_provisioning_duration_seconds",
                                           "Time a provisioning operation took, whatever its outcome.",
                                           ["operation"], registry=registry,
                                           buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)),
        )

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        method = method if method in _METHODS else "OTHER"
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    @contextmanager
    def provisioning_timer(self, operation: str) -> Iterator[None]:
        """Count and time one of register_user | delete_user | create_workspace | delete_workspace."""
        start = time.perf_counter()
        outcome = "error"
        try:
            yield
            outcome = "ok"
        finally:
            self.provisioning.labels(operation, outcome).inc()
            self.provisioning_seconds.labels(operation).observe(time.perf_counter() - start)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


