"""The one interface every place an experiment can run behind: local processes, a cluster, the service."""
from __future__ import annotations

import abc
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Iterator, Optional

if TYPE_CHECKING:  # the spec (pydantic) is imported by the commands that need it, not by --help
    from dlmctl.spec import Experiment
    from dlmctl.spec.contracts import EvalEvent


@dataclass(frozen=True)
class ExperimentSummary:
    name: str
    phase: str
    runs: int
    succeeded: int
    created: Optional[datetime] = None
    namespace: Optional[str] = None


@dataclass(frozen=True)
class Comparison:
    """An experiment with each run's freshest metrics in its status, and each run's evaluations so far
    (run name -> eval events in the order the run wrote them; a run with none may be missing)."""
    experiment: "Experiment"
    evals: dict[str, list["EvalEvent"]]


class Backend(abc.ABC):
    """submit / list / get / logs / cancel. Errors the user can fix raise `dlmctl.cli.errors.UserError`."""

    name: str = "abstract"
    namespaced: bool = False  # whether `list` can show every namespace (`dlmctl list -A`)

    def where(self, experiment: Optional["Experiment"] = None) -> str:
        """Where this backend runs experiments, for the line `submit` prints before it starts any."""
        return "the local backend (this machine)" if self.name == "local" else f"the {self.name} backend"

    @abc.abstractmethod
    def submit(self, experiment: "Experiment", replace: bool = False, fresh: bool = False) -> list[str]:
        """Start every run of a validated experiment; return the run names. Nothing is created on error.

        `replace` replaces an existing experiment of the same name (cancelling it if it still runs).
        `fresh` starts every run over at step 0 instead of resuming from its checkpoints.
        """

    @abc.abstractmethod
    def list(self) -> list[ExperimentSummary]:
        """Every experiment this backend knows, oldest first. A `namespaced` backend also takes
        `all_namespaces=True`."""

    @abc.abstractmethod
    def get(self, name: str) -> "Experiment":
        """The experiment as submitted, with `status` filled in. Unknown names raise NotFound."""

    @abc.abstractmethod
    def logs(self, name: str, run: Optional[str] = None, follow: bool = False) -> Iterator[str]:
        """Log lines (without newlines) of one run, or of every run prefixed with its name.

        With `follow`, keep yielding until the runs have finished.
        """

    @abc.abstractmethod
    def cancel(self, name: str) -> None:
        """Stop every run that has not finished; they end Cancelled."""

    def compare(self, name: str) -> Comparison:
        """The experiment with each run's freshest metrics and evaluations, for `dlmctl compare`."""
        return Comparison(self.get(name), {})

    def artifacts(self, run: str) -> str:
        """Where a run's outputs (checkpoints, metrics) are: a local path or a URI. For sample/export."""
        from dlmctl.cli.errors import UserError

        raise UserError(f"the {self.name} backend cannot locate run outputs; pass the run's output directory instead")


class ClusterBackend(Backend):
    """A backend whose experiments are Experiment objects in a cluster's namespaces (kubernetes, service)."""

    namespaced = True
    namespace: str = "default"  # -n, else a context's, else default
    explicit_namespace: Optional[str] = None  # -n

    def _submittable(self, experiment: "Experiment", fresh: bool) -> tuple[str, str]:
        """(name, namespace) of an experiment a cluster can run; otherwise one line, before anything is sent."""
        from dlmctl.cli.errors import UserError
        from dlmctl.operator.jobs import check_cluster_ready
        from dlmctl.spec import SpecError

        if fresh:
            raise UserError(f"--fresh: the {self.name} backend cannot start runs over yet (they resume from the "
                            "checkpoints under spec.checkpoint.uri); choose a new checkpoint URI or experiment name")
        try:
            check_cluster_ready(experiment)
        except SpecError as err:
            raise SpecError(f"{err} (or run it on this machine with --backend local)") from None
        return experiment.metadata.name, self._namespace_for(experiment)

    def _namespace_for(self, experiment: Optional["Experiment"]) -> str:
        """The spec's metadata.namespace if it has one (as `kubectl create` does), else this backend's."""
        from dlmctl.cli.errors import UserError

        own = experiment.metadata.namespace if experiment is not None else None
        if own and self.explicit_namespace and own != self.explicit_namespace:
            raise UserError(f"metadata.namespace: the spec says {own!r} but --namespace says "
                            f"{self.explicit_namespace!r}; drop one of them")
        return own or self.namespace
