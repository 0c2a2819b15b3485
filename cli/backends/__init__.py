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


def get_backend(name: Optional[str] = None) -> Backend:
    from dlmctl.cli.errors import UserError

    name = name or os.environ.get("DLMCTL_BACKEND") or default_backend()
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if not available(name):
        raise UserError(f"the {name} backend is not available in this version of dlmctl; use --backend local")
    module, _, cls = BACKENDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)()


def _cluster_configured() -> bool:
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return True
    paths = os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    return any(Path(p).is_file() for p in paths.split(os.pathsep) if p)
