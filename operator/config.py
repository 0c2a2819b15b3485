"""The operator's settings, from `DLMCTL_OPERATOR_*` environment variables (or `python -m dlmctl.operator` flags)."""
from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class OperatorConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="DLMCTL_OPERATOR_", extra="forbid")

    reconcile_interval: float = Field(default=5.0, gt=0, description="seconds between two looks at an experiment")
    progress_interval: float = Field(default=15.0, ge=0, description="seconds between two reads of a run's metrics")
    restart_backoff: float = Field(default=10.0, ge=0, description="wait before the first recreation of a run's job")
    restart_backoff_max: float = Field(default=300.0, ge=0, description="the backoff doubles per restart up to this")
    metrics_port: int = Field(default=8080, ge=0, le=65535, description="Prometheus /metrics; 0 disables")
    metrics_addr: str = "0.0.0.0"
    health_port: int = Field(default=8081, ge=0, le=65535, description="kopf liveness endpoint /healthz; 0 disables")
    peering: str = Field(default="dlmctl", description="the ClusterKopfPeering (or KopfPeering) shared by the replicas")
    peering_lifetime: int = Field(default=15, ge=2, description="seconds after which a silent replica counts as dead")
    workers: int = Field(default=16, ge=1, description="threads running reconciles")

    def backoff(self, restarts: int) -> float:
        """Before the (restarts+1)-th recreation."""
        return min(self.restart_backoff * 2 ** restarts, self.restart_backoff_max)
