"""The service's Prometheus metrics (`spec.metrics.SERVICE_METRICS`): requests by route template (never the
raw path: no namespace or name becomes a label value) and status, and their latency."""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from dlmctl.spec.metrics import SERVICE_REQUEST_DURATION, SERVICE_REQUESTS, register


class ServiceMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        self._requests = register(SERVICE_REQUESTS, self.registry)
        self._seconds = register(SERVICE_REQUEST_DURATION, self.registry)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self._requests.labels(method, route, str(status)).inc()
        self._seconds.labels(method, route).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
