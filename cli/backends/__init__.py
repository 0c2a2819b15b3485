"""Choosing a backend: `--server`, `--backend` (else $DLMCTL_BACKEND), `--context`, the current context of the
config file (cli/contexts.py), else a cluster when one is configured, else local.

A backend is registered by name with the module and class that implement it.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Optional

from dlmctl.spec.settings import ClientSettings, read

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
                namespace: Optional[str] = None, server: Optional[str] = None) -> Backend:
    """The backend for what the command line asked, first match wins: `--backend`; `--server` (the service
    backend); `--context` (a context of the config file, else a kubeconfig context: the kubernetes backend);
    $DLMCTL_BACKEND; the current context's backend; `--namespace` alone (kubernetes); `default_backend()`.
    A context's settings (server, token, namespace, kubeconfig context) apply only to its own backend."""
    from dlmctl.cli import contexts
    from dlmctl.cli.errors import UserError

    config = contexts.load()
    chosen: Optional[tuple[str, contexts.Context]] = None
    kube_context = None
    if context and context in config.contexts:
        chosen = (context, config.contexts[context])
    elif context:
        kube_context = context
    else:
        chosen = config.current_context()
    if server and name not in (None, "service"):
        raise UserError(f"--server: the {name} backend has no server (it is the service backend's)")
    name = (name or ("service" if server else None) or ("kubernetes" if kube_context else None)
            or (chosen[1].backend if context and chosen else None) or read(ClientSettings).backend
            or (chosen[1].backend if chosen else None) or ("kubernetes" if namespace else default_backend()))
    if name not in BACKENDS:
        raise UserError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if not available(name):
        raise UserError(f"the {name} backend is not available in this version of dlmctl; use --backend local")
    own = chosen[1] if chosen is not None and chosen[1].backend == name else None
    cluster_options = {k: v for k, v in (("context", kube_context), ("namespace", namespace)) if v}
    if name == "local" and cluster_options:
        given = " and ".join(f"--{k}" for k in cluster_options)
        raise UserError(f"{given}: the {name} backend has no Kubernetes contexts or namespaces "
                        "(use --backend kubernetes)")
    if name == "service" and kube_context:
        raise UserError(f"--context: {kube_context!r} is no dlmctl context (dlmctl config get-contexts), and the "
                        "service backend has no kubeconfig contexts")
    module, _, cls = BACKENDS[name].partition(":")
    factory = getattr(importlib.import_module(module), cls)
    if name == "kubernetes":
        return factory(context=kube_context or (own and own.kube_context), namespace=namespace,
                       default_namespace=own and own.namespace)
    if name == "service":
        return _service(factory, server, namespace, chosen[0] if own else None, own)
    return factory()


def _service(factory, server: Optional[str], namespace: Optional[str], context_name: Optional[str],
             context) -> Backend:
    """The service backend. The token comes from $DLMCTL_TOKEN, else from the context -- and a context's
    token, CA bundle and namespace only go to that context's own server."""
    from dlmctl.cli import contexts
    from dlmctl.cli.errors import UserError
    from .service import normalize_server

    if context is not None and server and (
            not context.server or normalize_server(server) != normalize_server(context.server)):
        context = None
    server = server or (context and context.server)
    if not server:
        where = f"context {context_name!r} names no server" if context_name else "no server given"
        raise UserError(f"the service backend needs the service's URL: {where}; pass --server URL or set it with "
                        "`dlmctl config set-context NAME --backend service --server URL`")
    token, source = read(ClientSettings).token, f"${contexts.TOKEN_ENV}"
    if not token and context is not None and context.token:
        token, source = context.token, f"context {context_name!r} in {contexts.config_path()}"
    return factory(server, token, namespace=namespace, default_namespace=context and context.namespace,
                   ca_file=context and context.ca_file, token_source=source)


def _cluster_configured() -> bool:
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return True
    paths = os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
    return any(Path(p).is_file() for p in paths.split(os.pathsep) if p)
