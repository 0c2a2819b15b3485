"""Every `DLMCTL_*` environment knob of the trainer and the CLI, defined once (pydantic-settings) and read
where it is used (`TrainerSettings()` / `ClientSettings()` read the environment as it is at that moment).
The operator's (`DLMCTL_OPERATOR_*`) and the service's (`DLMCTL_SERVICE_*`) are here too: the Helm chart
sets them. The spec reference lists all of them (`dlmctl docs`).

Variables that processes hand each other (the run spec, the local backend's run identity, a fresh start's
token) are contracts rather than knobs, and are named here too so that they are spelt once.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from typing import TypeVar

from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from .contracts import RUN_SPEC_ENV
from .load import SpecError

PREFIX = "DLMCTL_"
FRESH_ENV = f"{PREFIX}FRESH"
DATA_WORKERS_ENV = f"{PREFIX}DATA_WORKERS"


OFF = ("", "0", "false", "no")
S = TypeVar("S", bound=BaseSettings)


def read(settings: type[S]) -> S:
    """The settings as the environment gives them now; a bad value is a one-line SpecError naming it."""
    try:
        return settings()
    except ValidationError as err:
        first = err.errors()[0]
        raise SpecError(f"${PREFIX}{str(first['loc'][0]).upper()}: {first['msg']}") from None


def default_cache() -> Path:
    return Path.home() / ".cache" / "dlmctl" / "data"


class TrainerSettings(BaseSettings):
    """`python -m dlmctl.trainer` and `prepare-data`."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="ignore", env_ignore_empty=True)

    run_spec: Optional[str] = Field(None, validation_alias=RUN_SPEC_ENV, description="the resolved Run as JSON (set by the operator and the local "
                                                      "backend; `--run FILE` instead)")
    output: Optional[Path] = Field(None, description="where metrics.jsonl and local checkpoints go; default "
                                                     "./runs/<run> (`--output`)")
    cache: Path = Field(default_factory=default_cache,
                        description="the local token cache (default ~/.cache/dlmctl/data); spec.data.cache wins, "
                                    "and with an s3:// cache this holds its local copy")
    fresh: Optional[str] = Field(None, description="start over at step 0 (`--fresh`); the value names that fresh "
                                                   "start, so a restart with the same value resumes its own "
                                                   "checkpoints; empty, 0, false or no: off")
    staging: Optional[Path] = Field(None, description="where checkpoints are staged before upload; default "
                                                      "<output>/.staging (set it to a volume the node's processes "
                                                      "share)")
    max_staging_bytes: Optional[int] = Field(None, ge=1, description="refuse to stage a checkpoint larger than this")
    metrics_upload_seconds: float = Field(15, gt=0, description="how often metrics.jsonl is mirrored to the store")
    preflight_seconds: float = Field(10, gt=0, description="how long the first store request may take before the "
                                                           "endpoint is called unreachable")
    flush_after_signal_seconds: float = Field(20, gt=0, description="after SIGTERM: the most the last uploads may "
                                                                    "take")
    flush_at_end_seconds: float = Field(1800, gt=0, description="at the end: the most the last uploads may take")
    peak_flops: Optional[float] = Field(None, gt=0, description="the device's peak FLOP/s for MFU, when its name is "
                                                                "not in the table")
    metrics_addr: str = Field("0.0.0.0", description="the address rank 0's Prometheus endpoint binds")
    data_workers: int = Field(1, ge=1, description="prepare-data: how many workers share the shards (`--workers`; "
                                                   "the data-preparation Job sets it)")

    @property
    def fresh_token(self) -> Optional[str]:
        value = (self.fresh or "").strip()
        return None if value.lower() in OFF else value


class ClientSettings(BaseSettings):
    """The `dlmctl` command and its local backend."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="ignore", env_ignore_empty=True)

    home: Path = Field(default_factory=lambda: Path.home() / ".dlmctl",
                       description="the local backend's experiments, runs and logs (default ~/.dlmctl)")
    config: Optional[Path] = Field(None, description="the contexts file (`dlmctl config`); default $DLMCTL_HOME/config.yaml")
    token: Optional[str] = Field(None, description="the bearer token for the API service")
    backend: Optional[str] = Field(None, description="local, kubernetes or service, when neither a flag nor a "
                                                     "context says")
    debug: str = Field("", description="any value but 0, false or no: print the traceback of an internal error")
    watch_interval: float = Field(1.0, gt=0, description="seconds between looks of `get --wait`")
    local_parallel: int = Field(1, ge=1, description="local runs trained at the same time")
    cancel_grace: float = Field(10.0, ge=0, description="seconds a cancelled local run gets to checkpoint and stop")
    restart_backoff: float = Field(10.0, ge=0, description="seconds before a failed local run is restarted "
                                                           "(doubling with each restart)")
    local_launcher: str = Field("torchrun", description="how the local backend starts the trainer: torchrun or "
                                                        "python (one process, no restarts)")
    trainer_module: str = Field("dlmctl.trainer", description="the module the local backend runs as the trainer")

    @property
    def config_file(self) -> Path:
        return (self.config or self.home / "config.yaml").expanduser()

    @property
    def debugging(self) -> bool:
        return self.debug.strip().lower() not in OFF


class OperatorSettings(BaseSettings):
    """The operator (`python -m dlmctl.operator` flags override them)."""

    model_config = SettingsConfigDict(env_prefix="DLMCTL_OPERATOR_", extra="forbid")

    reconcile_interval: float = Field(default=5.0, gt=0, description="seconds between two looks at an experiment")
    progress_interval: float = Field(default=15.0, ge=0, description="seconds between two reads of a run's metrics")
    restart_backoff: float = Field(default=10.0, ge=0, description="wait before the first recreation of a run's job")
    restart_backoff_max: float = Field(default=300.0, ge=0, description="the backoff doubles per restart up to this")
    metrics_port: int = Field(default=8080, ge=0, le=65535, description="Prometheus /metrics; 0 disables")
    metrics_addr: str = Field(default="0.0.0.0", description="the address /metrics binds")
    health_port: int = Field(default=8081, ge=0, le=65535, description="kopf liveness endpoint /healthz; 0 disables")
    peering: str = Field(default="dlmctl", description="the ClusterKopfPeering (or KopfPeering) shared by the replicas")
    peering_lifetime: int = Field(default=15, ge=2, description="seconds after which a silent replica counts as dead")
    workers: int = Field(default=16, ge=1, description="threads running reconciles")
    kueue_check_interval: float = Field(
        default=30.0, gt=0, description="seconds between two asks whether Kueue has been installed, while it is not; "
        "once it is, the operator restarts itself to follow queued runs' Workloads")

    def backoff(self, restarts: int) -> float:
        """Before the (restarts+1)-th recreation."""
        return min(self.restart_backoff * 2 ** restarts, self.restart_backoff_max)


class ServiceSettings(BaseSettings):
    """The API service (`python -m dlmctl.service`)."""

    model_config = SettingsConfigDict(env_prefix="DLMCTL_SERVICE_", extra="ignore")

    host: str = Field(default="0.0.0.0", description="the address the API binds")
    port: int = Field(default=8000, ge=0, le=65535, description="the API's port")
    max_body_bytes: int = Field(default=1 << 20, gt=0, description="largest request body accepted (413 beyond)")
    kubeconfig: str = Field(default="", description="empty: the in-cluster configuration of the pod's ServiceAccount")
    context: Optional[str] = Field(default=None, description="the kubeconfig context (its current one if unset)")
    log_level: str = Field(default="info", description="uvicorn's log level")
    auth_cache_seconds: float = Field(
        default=5.0, ge=0, description="how long a TokenReview or SubjectAccessReview answer is reused (0: never)")
