"""The API service under load: 50 concurrent clients doing submit + list + get.

Starts the control plane of tests/testenv (real kube-apiserver with RBAC, scheduler, training-operator, KWOK nodes)
with the Experiment CRD, runs `python -m dlmctl.service` as a separate process authenticated as its ServiceAccount,
bound to exactly the ClusterRole the chart ships (dlmctl.service.manifests), and gives each client a ServiceAccount
token with a Role on Experiments in its namespace: every request is a real TokenReview + SubjectAccessReview + the
Kubernetes call. Each client thread (its own keep-alive HTTP connection) repeats, `--rounds` times:

- `submit`: POST /v1/namespaces/{ns}/experiments (a one-run Experiment, JSON), expecting 201;
- `list`:   GET  /v1/namespaces/{ns}/experiments, expecting 200 with the client's experiments in it;
- `get`:    GET  /v1/namespaces/{ns}/experiments/{name}, expecting 200.

Reports per verb the p50/p99/max latency in ms as the client sees it, and whether the targets hold
(p99 <= 100 ms for list and get, <= 300 ms for submit). `--namespaces` spreads the clients over that many
namespaces (teams); a list returns every Experiment of the namespace, so fewer namespaces mean longer lists.

    python benchmarks/bench_service.py [--clients 50] [--rounds 10] [--namespaces 10] [--output FILE.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import httpx  # noqa: E402
from kubernetes import client  # noqa: E402

from dlmctl.spec import GROUP, VERSION  # noqa: E402
from service_harness import ServiceProcess, grant_experiments, install_service_rbac  # noqa: E402
from testenv.cluster import Cluster  # noqa: E402

TARGET_P99_MS = {"submit": 300.0, "list": 100.0, "get": 100.0}
SPEC = {"arms": ["diffusion"], "model": {"preset": "nano"}, "data": {"unique_tokens": 8192, "seq_len": 64},
        "checkpoint": {"uri": "s3://dlmctl-test/bench"}}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]  # nearest rank


def measure(cluster: Cluster, workdir: Path, clients: int, rounds: int, namespaces: int) -> dict:
    stamp = int(time.time())
    names = [f"bench-svc-{stamp}-{i}" for i in range(namespaces)]
    tokens = {ns: grant_experiments(cluster, ns, "researcher") for ns in names}
    service = ServiceProcess(install_service_rbac(cluster), workdir / "service.log").start()
    latencies: dict[str, list[float]] = {verb: [] for verb in TARGET_P99_MS}
    lock = threading.Lock()
    try:
        def one_client(index: int) -> None:
            namespace = names[index % namespaces]
            base = f"{service.url}/v1/namespaces/{namespace}/experiments"
            with httpx.Client(headers={"Authorization": f"Bearer {tokens[namespace]}"}, timeout=60) as http:
                http.get(base).raise_for_status()  # connect and warm up outside the measurement
                mine: dict[str, list[float]] = {verb: [] for verb in TARGET_P99_MS}
                for r in range(rounds):
                    name = f"c{index:03d}-r{r:03d}"
                    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Experiment", "metadata": {"name": name},
                            "spec": SPEC}
                    answers = {}
                    for verb, send, expect in (
                        ("submit", lambda: http.post(base, json=body), 201),
                        ("list", lambda: http.get(base), 200),
                        ("get", lambda: http.get(f"{base}/{name}"), 200),
                    ):
                        started = time.perf_counter()
                        answers[verb] = response = send()
                        mine[verb].append((time.perf_counter() - started) * 1000)
                        if response.status_code != expect:
                            raise RuntimeError(f"{verb} {name}: {response.status_code} {response.text[:300]}")
                    if name not in {item["name"] for item in answers["list"].json()["items"]}:
                        raise RuntimeError(f"{name} submitted but not listed")
            with lock:
                for verb, values in mine.items():
                    latencies[verb].extend(values)

        started = time.monotonic()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(one_client, range(clients)))
        wall = time.monotonic() - started
        service.check_alive()
    finally:
        service.stop()
        with cluster.api_client() as api:
            for ns in names:
                client.CoreV1Api(api).delete_namespace(ns)
    result: dict = {"clients": clients, "rounds": rounds, "namespaces": namespaces, "wall_s": round(wall, 1),
                    "requests_per_s": round(sum(map(len, latencies.values())) / wall, 1)}
    for verb, values in latencies.items():
        p99 = percentile(values, 99)
        result[verb] = {"n": len(values), "p50_ms": round(statistics.median(values), 1), "p99_ms": round(p99, 1),
                        "max_ms": round(max(values), 1), "target_p99_ms": TARGET_P99_MS[verb],
                        "target_met": p99 <= TARGET_P99_MS[verb]}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=10, help="submit + list + get cycles per client")
    parser.add_argument("--namespaces", type=int, default=10, help="the clients are spread over this many")
    parser.add_argument("--output", type=Path, default=None, help="also write the result here (JSON)")
    parser.add_argument("--logs", type=Path, default=None, help="keep the service's log in this folder")
    args = parser.parse_args()
    crds = sorted(str(p) for p in (ROOT / "charts" / "dlmctl" / "crds").glob("*.yaml"))
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        os.environ.setdefault("DLMCTL_TESTENV_NODES", "4x8")
        cluster = Cluster.start(crds=crds)
        try:
            logs = args.logs or Path(tmp)
            logs.mkdir(parents=True, exist_ok=True)
            result = measure(cluster, logs, args.clients, args.rounds, args.namespaces)
        finally:
            cluster.cleanup()
    print(json.dumps(result))
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
