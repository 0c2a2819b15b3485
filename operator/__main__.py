"""`python -m dlmctl.operator` runs the operator; `python -m dlmctl.operator manifests` prints what installs it;
`python -m dlmctl.operator dashboards [--out DIR]` writes the Grafana dashboards (into the chart by default).

Settings come from DLMCTL_OPERATOR_* environment variables (see config.py). It watches the whole
cluster; its replicas meet in one ClusterKopfPeering, and only the one with the highest priority acts.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import threading


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dlmctl.operator", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the operator (the default)")
    for p in (parser, run):
        p.add_argument("--verbose", "-v", action="store_true")
    manifests = sub.add_parser("manifests", help="print the YAML that installs the operator")
    manifests.add_argument("--namespace", default="dlmctl-system")
    manifests.add_argument("--image", default=None)
    manifests.add_argument("--replicas", type=int, default=2)
    dashboards = sub.add_parser("dashboards", help="write the Grafana dashboards' JSON (default: into the chart)")
    dashboards.add_argument("--out", default=None, help="folder to write experiment.json and platform.json to")
    args = parser.parse_args(argv)
    if args.command == "manifests":
        return _print_manifests(args)
    if args.command == "dashboards":
        return _write_dashboards(args)
    return _run(args)


def _print_manifests(args) -> int:
    import yaml

    from .manifests import DEFAULT_IMAGE, install_manifests, peering_crd

    documents = [peering_crd(), *install_manifests(args.namespace, args.image or DEFAULT_IMAGE, args.replicas)]
    sys.stdout.write(yaml.safe_dump_all(documents, sort_keys=False))
    return 0


def _write_dashboards(args) -> int:
    from pathlib import Path

    from .dashboards import CHART_DASHBOARDS, write

    for path in write(Path(args.out) if args.out else CHART_DASHBOARDS):
        print(path)
    return 0


def _run(args) -> int:
    import kopf
    from pydantic import ValidationError

    from dlmctl.spec.settings import OperatorSettings
    from .handlers import register
    from .metrics import OperatorMetrics

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for noisy in ("kubernetes", "urllib3", "botocore", "aiobotocore", "s3fs", "asyncio", "kopf.objects"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        config = OperatorSettings()
    except ValidationError as err:
        print(f"error: {str(err).splitlines()[1]}: {str(err).splitlines()[2].strip()}", file=sys.stderr)
        return 2
    _ensure_peering(config)
    metrics = OperatorMetrics()
    metrics.serve(config.metrics_port, config.metrics_addr)
    registry = kopf.OperatorRegistry()
    kueue_served = _kueue_served()
    register(registry, config, metrics, kueue_served=kueue_served)
    stop, kueue_arrived = threading.Event(), threading.Event()
    if not kueue_served:
        threading.Thread(target=_stop_when_kueue_arrives, args=(config, stop, kueue_arrived), daemon=True,
                         name="kueue-check").start()
    kopf.run(
        registry=registry,
        clusterwide=True,
        peering_name=config.peering,
        standalone=False,
        liveness_endpoint=f"http://0.0.0.0:{config.health_port}/healthz" if config.health_port else None,
        stop_flag=stop,
    )
    if kueue_arrived.is_set():  # the same process, started afresh: it now watches Kueue's Workloads
        os.execv(sys.executable, [sys.executable, "-m", "dlmctl.operator", *sys.argv[1:]])
    return 0


def _kueue_served() -> bool:
    """Asked at start: the operator watches Kueue's Workloads only where they are served (kopf waits for every
    index to fill before it handles anything, and cannot fill one for a resource the cluster does not serve)."""
    from . import kueue
    from .handlers import api_client

    with api_client() as api:
        served = kueue.served(api)
    logging.getLogger("dlmctl.operator").info("Kueue %s", "found: queued runs follow their Workloads" if served
                                              else "not installed: runs naming spec.scheduling.queue fail")
    return served


def _stop_when_kueue_arrives(config, stop: threading.Event, kueue_arrived: threading.Event) -> None:
    """Kueue installed after the operator started: stop kopf (it leaves the peering) so that the operator starts
    again, this time following Workloads."""
    from . import kueue
    from .handlers import api_client

    if kueue.wait_until_served(api_client, config.kueue_check_interval, stop):
        logging.getLogger("dlmctl.operator").info("Kueue installed: restarting to follow queued runs' Workloads")
        kueue_arrived.set()
        stop.set()


def _ensure_peering(config) -> None:
    """The replicas meet in a ClusterKopfPeering; create ours if it is missing."""
    from kubernetes import client

    from .handlers import api_client
    from .manifests import PEERING_GROUP, PEERING_VERSION, peering

    with api_client() as api:
        try:
            client.CustomObjectsApi(api).create_cluster_custom_object(
                PEERING_GROUP, PEERING_VERSION, "clusterkopfpeerings", peering(config.peering))
        except client.rest.ApiException as err:
            if err.status != 409:
                raise


if __name__ == "__main__":
    sys.exit(main())
