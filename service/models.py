"""The bodies of the API besides the Experiment itself (which is `dlmctl.spec.Experiment`, the model the CRD
is generated from): what the routes return and every error, as pydantic models for /openapi.json."""
from __future__ import annotations

from datetime import datetime
from typing import Optional

from pydantic import BaseModel, Field

from dlmctl.spec import Experiment
from dlmctl.spec.comparison import ComparisonReport
from dlmctl.spec.contracts import EvalEvent


class ExperimentSummary(BaseModel):
    """One line of `dlmctl list` (operator.client.summary)."""
    name: str
    namespace: Optional[str] = None
    phase: str
    runs: int
    succeeded: int
    created: Optional[datetime] = None


class ExperimentList(BaseModel):
    items: list[ExperimentSummary]


class Deleted(BaseModel):
    deleted: str


class Cancelled(BaseModel):
    cancelled: str
    phase: Optional[str] = Field(default=None, description="present when the experiment had already finished")


class ComparisonBody(ComparisonReport):
    """What `dlmctl compare` shows: per sweep point each arm's best and last value, AR overfitting and the
    crossover, and the seeds' agreement (spec.comparison.ComparisonReport), with the experiment (each run's
    freshest metrics in its status) and each run's evaluations it was computed from."""
    experiment: Experiment
    evals: dict[str, list[EvalEvent]]


class FieldError(BaseModel):
    field: str = Field(description="dotted path, e.g. spec.data.epochs (empty when the error has none)")
    message: str


class ErrorBody(BaseModel):
    status: int
    message: str = Field(description="one line per error")
    errors: list[FieldError] = Field(default_factory=list)
    request_id: str


class Health(BaseModel):
    status: str
