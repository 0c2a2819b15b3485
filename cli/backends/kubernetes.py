"""A Kubernetes cluster: each experiment is an `Experiment` custom resource that the dlmctl operator runs.

The contract with the operator (operator/):
    submit   creates the Experiment (the user's spec; `.status` belongs to the operator), which makes one
             PyTorchJob per run owned by it; `--replace` deletes the old one first (propagation Foreground:
             its jobs go with it) and waits until it is gone;
    cancel   sets the annotation ANNOTATION_CANCEL (an RFC 3339 time); the operator suspends the jobs and
             marks the unfinished runs Cancelled; checkpoints are never deleted;
    get      the object with the `.status` the operator wrote (ExperimentStatus); none yet: every run Pending.
`logs` reads the master pod of each run's job; `compare` and `artifacts` read each run's store
(`<checkpoint.uri>/<run>/`) with the credentials of this machine's environment.

The requests are operator/client.py's ExperimentClient (the one the API service uses); this module adds the
kubeconfig and its contexts, and words each ClientError as the one line a terminal shows. The `kubernetes`
package is imported when a command uses this backend. Every failure the user can act on (no kubeconfig,
unknown context, unreachable server, missing CRD, forbidden, not found) is one line through UserError.
"""
from __future__ import annotations

import logging
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

from dlmctl.operator import client as experiments

from ..errors import NotFound, UserError, one_line
from .base import ClusterBackend, Comparison, ExperimentSummary
from .local_state import home

if TYPE_CHECKING:
    from dlmctl.spec import Experiment

IN_CLUSTER_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
INSTALL_CRD = "kubectl apply -f charts/dlmctl/crds/"
STORE_FILES = ("tokenizer.json", "metrics.jsonl")  # what sample/export read besides run.json and the checkpoints


class KubernetesBackend(ClusterBackend):
    name = "kubernetes"

    def __init__(self, context: Optional[str] = None, namespace: Optional[str] = None,
                 default_namespace: Optional[str] = None):
        """`namespace` is the one asked for (-n); `default_namespace` (a dlmctl context's) comes before the
        kubeconfig context's."""
        from kubernetes import client

        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # its retry warnings are not ours
        configuration, self.kubeconfig, self.context, context_namespace = _load_configuration(context)
        configuration.retries = 1
        self.server = configuration.host
        self.explicit_namespace = namespace
        self.namespace = namespace or default_namespace or context_namespace or "default"
        self.client = experiments.ExperimentClient(client.ApiClient(configuration))

    def where(self, experiment: Optional["Experiment"] = None) -> str:
        namespace = self._namespace_for(experiment)
        return f"the kubernetes backend: context {self.context}, namespace {namespace} ({self.server})"

    # -- submit ---------------------------------------------------------------------------------
    def submit(self, experiment: "Experiment", replace: bool = False, fresh: bool = False) -> list[str]:
        name, namespace = self._submittable(experiment, fresh)
        with self._one_line():
            self.client.check_queues(experiment, namespace)
            if replace:
                self.client.delete_and_wait(name, namespace)
            try:
                self.client.create(experiment, namespace)
            except experiments.Conflict:
                raise UserError(
                    f"metadata.name: experiment {name!r} already exists in namespace {namespace!r} "
                    f"({self.client.phase_of(name, namespace)}); pass --replace to replace it, or choose another name"
                ) from None
        return [run.name for run in experiment.runs()]

    # -- list / get / cancel --------------------------------------------------------------------
    def list(self, all_namespaces: bool = False) -> list[ExperimentSummary]:
        with self._one_line():
            return [ExperimentSummary(**s) for s in self.client.summaries(None if all_namespaces else self.namespace)]

    def get(self, name: str) -> "Experiment":
        with self._one_line():
            return self.client.get(name, self.namespace)

    def cancel(self, name: str) -> None:
        with self._one_line():
            self.client.cancel(name, self.namespace)

    # -- logs -----------------------------------------------------------------------------------
    def logs(self, name: str, run: Optional[str] = None, follow: bool = False) -> Iterator[str]:
        experiment = self.get(name)
        runs = [r.name for r in experiment.status.runs]
        if run is not None and run not in runs:
            raise NotFound(f"--run: experiment {name!r} has no run {run!r} (its runs: {', '.join(runs)})")
        selected = [run] if run else runs
        prefix = (lambda r: f"[{r}] ") if len(selected) > 1 else (lambda r: "")
        with self._one_line():
            if follow:
                yield from experiments.merged([
                    lambda emit, stop, r=r: self.client.follow_run(
                        name, r, self.namespace, lambda line: emit(prefix(r) + line), stop, note=_note,
                        words=lambda err: str(self._user_error(err)))
                    for r in selected
                ])
                return
            phases = {r.name: r for r in experiment.status.runs}
            for r in selected:
                pod = self.client.master_pod(r, self.namespace)
                if pod is None:
                    _note(f"{r}: {'no pod left' if experiments.terminal(phases[r].phase) else 'no pod yet'} "
                          f"({experiments.phase_words(phases[r])})")
                    continue
                if not experiments.started(pod):
                    _note(f"{r}: pod {pod.metadata.name} has not started yet ({experiments.waiting_reason(pod)})")
                    continue
                try:
                    for line in experiments.lines(self.client.open_log(pod, self.namespace, follow=False)):
                        yield prefix(r) + line
                except experiments.ClientError as err:
                    if err.status != 400:  # 400: the kubelet has no log for it (yet)
                        raise
                    _note(f"{r}: {self._user_error(err)}")

    # -- compare / artifacts --------------------------------------------------------------------
    def compare(self, name: str) -> Comparison:
        """Each run's metrics from its store, which is fresher than what the operator last wrote; where the
        store cannot be read, that status (and one line on stderr saying so)."""
        with self._one_line():
            experiment, evals, failed = self.client.compare(name, self.namespace)
        if failed:
            uri, err = failed
            _note(f"warning: cannot read {uri} ({experiments.describe(err)}); "
                  "showing the progress the operator last recorded")
        return Comparison(experiment, evals)

    def artifacts(self, run: str) -> str:
        """`$DLMCTL_HOME/clusters/<context>/<namespace>/<run>/` with run.json and, from the run's store,
        tokenizer.json and metrics.jsonl: what sample/export read; the checkpoints stay in the store."""
        from dlmctl.operator.progress import run_store_uri, s3_filesystem

        with self._one_line():
            found = self.client.find_run(run, self.namespace)
        if found is None:
            raise NotFound(f"no run named {run!r} in namespace {self.namespace!r} (context {self.context}; "
                           "dlmctl get EXPERIMENT lists its runs)")
        uri = found.spec.checkpoint.uri or ""
        if not uri.startswith("s3://"):
            raise UserError(f"run {run}: spec.checkpoint.uri is {uri or 'not set'}, not an s3:// URI; "
                            "its pods kept no checkpoints anywhere this machine can read")
        folder = home() / "clusters" / _path_safe(self.context) / self.namespace / run
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "run.json").write_text(found.model_dump_json(indent=1))
        store = run_store_uri(uri, run)
        try:
            fs = s3_filesystem(found.spec.checkpoint.endpoint_url)
            for file in STORE_FILES:
                target, partial = folder / file, folder / f".{file}.partial"
                try:
                    fs.get_file(f"{store}/{file}", str(partial))
                except FileNotFoundError:
                    target.unlink(missing_ok=True)
                    continue
                os.replace(partial, target)
        except Exception as err:
            raise UserError(f"run {run}: cannot read its store {store}/ ({experiments.describe(err)})") from None
        if not (folder / "tokenizer.json").is_file():
            raise UserError(f"run {run}: its store {store}/ has no tokenizer.json yet (the run has not started "
                            "training, or its trainer does not upload it)")
        return str(folder)

    # -- errors ---------------------------------------------------------------------------------
    @contextmanager
    def _one_line(self):
        """What the API server refused, as the one line for a terminal."""
        try:
            yield
        except experiments.ClientError as err:
            raise self._user_error(err) from None

    def _user_error(self, err: experiments.ClientError) -> UserError:
        """One line naming what was asked, of which server, through which context."""
        where = f"in namespace {err.namespace!r}" if err.namespace else "in any namespace"
        what = "experiment" if err.resource == experiments.RESOURCE else err.resource.rstrip("s")
        target = f"{what} {err.name}" if err.name else err.resource
        if isinstance(err, experiments.Unreachable):
            return UserError(f"cannot reach the Kubernetes API server {self.server} (context {self.context}): "
                             f"{err.message}")
        if isinstance(err, experiments.InvalidExperiment):
            return UserError(err.message)
        if isinstance(err, experiments.NotFound) and err.name:
            return NotFound(f"no {what} named {err.name!r} {where} (context {self.context}"
                            + ("; dlmctl list shows them)" if err.resource == experiments.RESOURCE else ")"))
        if isinstance(err, experiments.NotInstalled):
            return UserError(f"the Experiment resource ({experiments.RESOURCE}/{experiments.VERSION}) is not "
                             f"installed in the cluster of context {self.context} ({self.server}); install it with "
                             f"`{INSTALL_CRD}` (or the dlmctl Helm chart)")
        if isinstance(err, experiments.Forbidden):
            return UserError(f"permission denied: {err.user or 'you'} may not {err.verb} {err.resource} {where} "
                             f"(context {self.context}); ask a cluster admin for a Role that allows it")
        if isinstance(err, experiments.Unauthorized):
            return UserError(f"unauthorized: {self.server} rejected the credentials of context {self.context} "
                             "(an expired token or certificate?)")
        if isinstance(err, experiments.StillDeleting):
            return UserError(f"experiment {err.name!r} {where} is {err.message}; try --replace again later")
        if isinstance(err, experiments.Conflict):
            return UserError(f"{what} {err.name!r} {where} already exists")
        if isinstance(err, experiments.Invalid):
            return UserError(f"the API server refused to {err.verb} {target} {where}: {err.message}")
        return UserError(f"cannot {err.verb} {target} {where}: the API server {self.server} answered "
                         f"{err.status} {err.reason}: {err.message}")


# -- configuration ----------------------------------------------------------------------------------

def _load_configuration(context: Optional[str]):
    """(client configuration, kubeconfig path, context name, the context's namespace)."""
    from kubernetes import client, config

    configuration = client.Configuration()
    # Read at call time: the client reads $KUBECONFIG once, when it is imported.
    paths = os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    existing = [str(Path(p).expanduser()) for p in paths.split(os.pathsep) if p and Path(p).expanduser().is_file()]
    if not existing:
        if os.environ.get("KUBERNETES_SERVICE_HOST") and context is None:  # inside a pod
            try:
                config.load_incluster_config(client_configuration=configuration)
            except Exception as err:
                raise UserError(f"in-cluster Kubernetes configuration: {one_line(err)}") from None
            namespace = IN_CLUSTER_NAMESPACE.read_text().strip() if IN_CLUSTER_NAMESPACE.is_file() else None
            return configuration, None, "in-cluster", namespace
        raise UserError(f"no kubeconfig: {paths} does not exist; point KUBECONFIG at one "
                        "(or run on this machine with --backend local)")
    where = os.pathsep.join(existing)
    try:
        contexts, current = config.list_kube_config_contexts(config_file=where)
    except Exception as err:
        raise UserError(f"{where}: not a usable kubeconfig: {one_line(err)}") from None
    names = [c["name"] for c in contexts or []]
    if context is None:
        if not current:
            raise UserError(f"{where} has no current context; choose one with --context "
                            f"({', '.join(names) or 'it defines none'})")
        context = current["name"]
    if context not in names:
        raise UserError(f"--context: no context {context!r} in {where} (its contexts: {', '.join(names) or 'none'})")
    entry = next(c for c in contexts if c["name"] == context)
    try:
        config.load_kube_config(config_file=where, context=context, client_configuration=configuration,
                                persist_config=False)
    except Exception as err:
        raise UserError(f"kubeconfig context {context}: {one_line(err)}") from None
    return configuration, where, context, (entry.get("context") or {}).get("namespace")


# -- helpers ----------------------------------------------------------------------------------------

def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _path_safe(name: str) -> str:
    """A context name as one folder name (EKS contexts look like arn:aws:eks:…:cluster/name)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "context"
