"""The bodies of the API besides the Experiment itself (which is `dlmctl.spec.Experiment`, the model the CRD
is generated from): what the routes return and every error, as pydantic models for /openapi.json."""
from __future__ import annotations

from datetime import datetime
from typing import Optional

from pydantic import BaseModel, Field

from dlmctl.spec import Experiment
from dlmctl.spec.comparison import PointComparison
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


class ComparisonBody(BaseModel):
    """What `dlmctl compare` shows: the experiment with each run's freshest metrics, each run's evaluations,
    and per sweep point the best/final losses and the crossover (spec.comparison)."""
    experiment: Experiment
    evals: dict[str, list[EvalEvent]]
    points: list[PointComparison]


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
