"""Choosing a backend: `--backend`, else $DLMCTL_BACKEND, else a cluster when one is configured, else local.

A backend is registered by name with the module and class that implement it; later issues add
`kubernetes` and `service` by dropping in their modules (the registry already names them).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Optional

from .base import Backend, ExperimentSummary

BACKENDS: dict[str, str] = {
    "local": "dlmctl.cli.backends.local:LocalBackend",
    "kubernetes": "dlmctl.cli.backends.kubernetes:KubernetesBackend",
    "service": "dlmctl.cli.backends.service:ServiceBackend",
}

__all__ = ["BACKENDS", "Backend", "ExperimentSummary", "available", "default_backend", "get_backend"]


def available(name: str) -> bool:
    module = BACKENDS[name].partition(":")[0]
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def default_backend() -> str:
    """The cluster when a Kubernetes context is configured (and its backend is installed), else local."""
    if _cluster_configured() and available("kubernetes"):
        return "kubernetes"
    return "local"


def get_backend(name: Optional[str] = None, *, context: Optional[str] = None,
                namespace: Optional[str] = None) -> Backend:
    """The backend by name; `context` and `namespace` pick the cluster and namespace of the kubernetes
    backend (given without a backend name, they choose it)."""
    from dlmctl.cli.errors import UserError

    cluster_options = {k: v for k, v in (("context", context), ("namespace", namespace)) if v}
    name = name or os.environ.get("DLMCTL_BACKEND") or ("kubernetes" if cluster_options else default_backend())
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if not available(name):
        raise UserError(f"the {name} backend is not available in this version of dlmctl; use --backend local")
    if cluster_options and name != "kubernetes":
        given = " and ".join(f"--{k}" for k in cluster_options)
        raise UserError(f"{given}: the {name} backend has no Kubernetes contexts or namespaces "
                        "(use --backend kubernetes)")
    module, _, cls = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)(**cluster_options)


def _cluster_configured() -> bool:
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return True
    paths = os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    return any(Path(p).is_file() for p in paths.split(os.pathsep) if p)
