"""The experiment the CLI's cluster tests submit ("scarce": a DLM and an AR run), and what the operator and the
training-operator would make of it on the test control plane: its status and its runs' master pods. The
fixtures `experiment_crd` and `kube` (the CLI pointed at the test cluster) are conftest's."""
from __future__ import annotations

import sys

import yaml
from kubernetes import client

from dlmctl.operator.jobs import LABEL_ARM, LABEL_EXPERIMENT, LABEL_RUN
from dlmctl.spec import GROUP, PLURAL, VERSION

NAME = "scarce"
RUNS = ["scarce-dlm", "scarce-ar"]


def spec_text(name: str = NAME, uri: str | None = "s3://ckpt/scarce", endpoint: str | None = None) -> str:
    checkpoint = {"uri": uri, "endpoint_url": endpoint}
    spec = {
        "apiVersion": "dlmctl.io/v1alpha1", "kind": "Experiment",
        "metadata": {"name": name, "labels": {"team": "scarcity"}},
        "spec": {"data": {"unique_tokens": 131072, "epochs": 4}, "metrics": {"port": 0},
                 "batch": {"global_sequences": 64, "micro_batch_sequences": 4},
                 "resources": {"nodes": 2, "gpus_per_node": 8},
                 "checkpoint": {k: v for k, v in checkpoint.items() if v}},
    }
    return yaml.safe_dump(spec)


def read(custom, ns, name=NAME) -> dict:
    return custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)


def experiments(custom, ns) -> list[dict]:
    return custom.list_namespaced_custom_object(GROUP, VERSION, ns, PLURAL)["items"]


def write_status(custom, ns, status: dict, name=NAME) -> None:
    """As the operator does: through the status subresource."""
    custom.patch_namespaced_custom_object_status(GROUP, VERSION, ns, PLURAL, name, {"status": status})


def master_pod(core, ns, run: str, arm: str, program: str, replica_type: str = "master") -> str:
    """The pod a PyTorchJob of the run would have (its master, or another replica), running `program` (the pod
    executor runs it)."""
    name = f"{run}-{replica_type}-0"
    labels = {LABEL_EXPERIMENT: NAME, LABEL_RUN: run, LABEL_ARM: arm, "training.kubeflow.org/replica-type": replica_type}
    core.create_namespaced_pod(ns, client.V1Pod(
        metadata=client.V1ObjectMeta(name=name, labels=labels),
        spec=client.V1PodSpec(restart_policy="Never", containers=[
            client.V1Container(name="pytorch", image="trainer", command=[sys.executable, "-u", "-c", program])])))
    return name
