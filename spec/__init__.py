"""The Experiment resource as pydantic models: the single source of truth for the CRD, schema and docs."""
from .experiment import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    Experiment,
    ExperimentSpec,
    ExperimentStatus,
    Run,
    RunStatus,
)
from .load import SpecError, absolute_local_paths, check_local_paths, experiment_from_dict, load_experiment, parse_yaml
from .model import PRESETS, ModelShape, ModelSpec
from .redact import redact
from .sections import Arm

__all__ = [
    "API_VERSION", "GROUP", "KIND", "PLURAL", "VERSION", "Arm", "Experiment", "ExperimentSpec",
    "ExperimentStatus", "ModelShape", "ModelSpec", "PRESETS", "Run", "RunStatus", "SpecError",
    "absolute_local_paths", "check_local_paths", "experiment_from_dict", "load_experiment", "parse_yaml", "redact",
]
