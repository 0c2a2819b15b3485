"""The API service under load: 50 concurrent clients doing submit + list + get, against the same verbs made
directly on the Kubernetes API server (the floor the cluster imposes on this machine).

Starts the control plane of tests/testenv (real kube-apiserver with RBAC, scheduler, training-operator, KWOK nodes)
with the Experiment CRD. Two phases, each in fresh namespaces (so lists grow alike), with the same clients and the
same randomised schedule:

- `direct`:  each client its own kubernetes `ApiClient` with a researcher's ServiceAccount token, calling the API
  server itself (create / list / get of the Experiment custom object; a create sends the object the service would
  store: the spec in full, defaults included): the floor;
- `service`: `python -m dlmctl.service` as a separate process authenticated as its ServiceAccount, bound to exactly
  the ClusterRole the chart ships (dlmctl.service.manifests); each client an HTTP keep-alive connection with a
  researcher's token (a Role on Experiments in its namespace): every request is a real TokenReview +
  SubjectAccessReview (each cached for the service's auth_cache_seconds) + the Kubernetes call as the caller.

Each client thread does `--rounds` submits, lists and gets in a random order (seeded; a get asks for one of the
client's earlier submissions; one submission and one list before the clock starts warm the connection), and
checks every answer: 201 / 200, each list holds everything the client had submitted.

Reports per phase and verb the p50/p99/max latency in ms as the client sees it, the requests/s, the wall time and
the CPU seconds spent meanwhile by the service (with its worker processes), kube-apiserver, etcd, this benchmark
process and the whole machine (and what each spends per second idle, measured just before); the service/direct
ratio of p50 and p99 per verb; and whether the targets hold (p99 <= 100 ms for list and get, <= 300 ms for
submit). The load is a closed loop: by Little's law the mean latency
is clients / (requests/s), so on a machine whose cores are all busy the latency follows the throughput.
Nothing is written into the repository (the service's log goes to a temporary folder unless `--logs`).

    python benchmarks/bench_service.py [--clients 50] [--rounds 10] [--namespaces 10] [--seed 0]
        [--service-env DLMCTL_SERVICE_WORKERS=2 ...] [--output FILE.json] [--logs DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import httpx  # noqa: E402
import psutil  # noqa: E402
from kubernetes import client, config  # noqa: E402

from dlmctl.spec import GROUP, PLURAL, VERSION, experiment_from_dict  # noqa: E402
from service_harness import ServiceProcess, grant_experiments, install_service_rbac  # noqa: E402
from testenv.cluster import Cluster  # noqa: E402

VERBS = ("submit", "list", "get")
IDLE_SECONDS = 3.0
TARGET_P99_MS = {"submit": 300.0, "list": 100.0, "get": 100.0}
EXPECTED_STATUS = {"submit": 201, "list": 200, "get": 200}
SPEC = {"arms": ["diffusion"], "model": {"preset": "nano"}, "data": {"unique_tokens": 8192, "seq_len": 64},
        "checkpoint": {"uri": "s3://dlmctl-test/bench"}}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]  # nearest rank


def experiment(name: str) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Experiment", "metadata": {"name": name}, "spec": SPEC}


def schedule(seed: int, index: int, rounds: int) -> list[str]:
    """The client's verbs in a random order (the same in both phases)."""
    verbs = [verb for verb in VERBS for _ in range(rounds)]
    random.Random(seed * 100_003 + index).shuffle(verbs)
    return verbs


class Caller:
    """One client's way to do the three verbs; each returns the names it listed (list) or None."""

    def submit(self, name: str) -> None: ...

    def list(self) -> set[str]: ...

    def get(self, name: str) -> None: ...

    def close(self) -> None: ...


def stored_body(name: str, namespace: str) -> dict:
    """The object the service stores for `experiment(name)`: the spec validated and written out in full, defaults
    included (as operator.client.ExperimentClient.create does), so that the API server validates (its CEL rules)
    and lists objects of the same size in both phases."""
    body = experiment_from_dict(experiment(name), "benchmark").model_dump(mode="json", exclude_none=True,
                                                                           exclude={"status"})
    body["metadata"]["namespace"] = namespace
    return body


class DirectCaller(Caller):
    """The kubernetes client straight to the API server, with the researcher's token, storing what the service
    would store."""

    def __init__(self, base: client.Configuration, token: str, namespace: str):
        configuration = client.Configuration()
        configuration.host, configuration.ssl_ca_cert = base.host, base.ssl_ca_cert
        configuration.verify_ssl = base.verify_ssl
        configuration.api_key = {"authorization": f"Bearer {token}"}
        self.api = client.ApiClient(configuration)
        self.custom, self.namespace = client.CustomObjectsApi(self.api), namespace
        self.template = stored_body("template", namespace)

    def submit(self, name: str) -> None:
        body = {**self.template, "metadata": {**self.template["metadata"], "name": name}}
        self.custom.create_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, body)

    def list(self) -> set[str]:
        found = self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL)
        return {item["metadata"]["name"] for item in found["items"]}

    def get(self, name: str) -> None:
        self.custom.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    def close(self) -> None:
        self.api.close()


class ServiceCaller(Caller):
    """HTTP to the service (one keep-alive connection), with the researcher's token."""

    def __init__(self, url: str, token: str, namespace: str):
        self.base = f"{url}/v1/namespaces/{namespace}/experiments"
        self.http = httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=120)

    def _expect(self, verb: str, response: httpx.Response) -> httpx.Response:
        if response.status_code != EXPECTED_STATUS[verb]:
            raise RuntimeError(f"{verb} {response.request.url}: {response.status_code} {response.text[:300]}")
        return response

    def submit(self, name: str) -> None:
        self._expect("submit", self.http.post(self.base, json=experiment(name)))

    def list(self) -> set[str]:
        return {item["name"] for item in self._expect("list", self.http.get(self.base)).json()["items"]}

    def get(self, name: str) -> None:
        self._expect("get", self.http.get(f"{self.base}/{name}"))

    def close(self) -> None:
        self.http.close()


class CpuMeter:
    """CPU seconds (user + system) of named processes (the service's with its worker processes) and of the
    whole machine."""

    def __init__(self, pids: dict[str, int], with_children: tuple[str, ...] = ("service",)):
        self.processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.with_children = with_children

    def _seconds(self, name: str, process: psutil.Process) -> float:
        total = 0.0
        for p in [process, *(process.children(recursive=True) if name in self.with_children else ())]:
            try:
                times = p.cpu_times()
                total += times.user + times.system
            except psutil.NoSuchProcess:
                pass
        return total

    def read(self) -> dict[str, float]:
        machine = psutil.cpu_times()
        return {**{name: self._seconds(name, p) for name, p in self.processes.items()},
                "machine": machine.user + machine.system + getattr(machine, "nice", 0.0)}

    @staticmethod
    def spent(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {name: round(after[name] - before[name], 2) for name in before}


def run_phase(make_caller: Callable[[int], Caller], clients: int, rounds: int, seed: int,
              meter: CpuMeter) -> dict:
    """Every client's schedule, concurrently; latencies per verb and the CPU spent meanwhile."""
    latencies: dict[str, list[float]] = {verb: [] for verb in VERBS}
    lock, ready = threading.Lock(), threading.Barrier(clients + 1)
    start = threading.Event()

    def one_client(index: int) -> None:
        caller = make_caller(index)
        mine: dict[str, list[float]] = {verb: [] for verb in VERBS}
        try:
            submitted = [f"c{index:03d}-warm"]
            caller.submit(submitted[0])  # connect and warm up outside the measurement
            caller.list()
            rng = random.Random(seed * 7919 + index)
        finally:
            ready.wait()
        start.wait()
        try:
            for k, verb in enumerate(schedule(seed, index, rounds)):
                name = f"c{index:03d}-{k:03d}" if verb == "submit" else rng.choice(submitted)
                started = time.perf_counter()
                if verb == "submit":
                    caller.submit(name)
                elif verb == "list":
                    listed = caller.list()
                else:
                    caller.get(name)
                mine[verb].append((time.perf_counter() - started) * 1000)
                if verb == "submit":
                    submitted.append(name)
                elif verb == "list" and not listed.issuperset(submitted):
                    raise RuntimeError(f"client {index}: {sorted(set(submitted) - listed)} submitted but not listed")
        finally:
            caller.close()
        with lock:
            for verb, values in mine.items():
                latencies[verb].extend(values)

    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(one_client, i) for i in range(clients)]
        ready.wait()
        time.sleep(1.0)  # what the machine spends while nobody asks anything (the other controllers, neighbours)
        idle_before, idle_started = meter.read(), time.monotonic()
        time.sleep(IDLE_SECONDS)
        idle = CpuMeter.spent(idle_before, meter.read())
        idle_per_s = {k: round(v / (time.monotonic() - idle_started), 2) for k, v in idle.items()}
        before, started = meter.read(), time.monotonic()
        start.set()
        for future in futures:
            future.result()
        wall = time.monotonic() - started
        cpu = CpuMeter.spent(before, meter.read())
    total = sum(map(len, latencies.values()))
    result: dict = {"wall_s": round(wall, 2), "requests": total, "requests_per_s": round(total / wall, 1),
                    "idle_cpu_per_s": idle_per_s, "cpu_s": cpu,
                    "cpu_s_per_request_ms": {k: round(v / total * 1000, 2) for k, v in cpu.items()}}
    for verb, values in latencies.items():
        result[verb] = {"n": len(values), "p50_ms": round(statistics.median(values), 1),
                        "p99_ms": round(percentile(values, 99), 1), "max_ms": round(max(values), 1),
                        "mean_ms": round(statistics.fmean(values), 1)}
    return result


def namespaces_for(cluster: Cluster, prefix: str, count: int) -> dict[str, str]:
    """Fresh namespaces, each with a researcher ServiceAccount allowed Experiments there: {namespace: token}."""
    return {ns: grant_experiments(cluster, ns, "researcher") for ns in (f"{prefix}-{i}" for i in range(count))}


def measure(cluster: Cluster, workdir: Path, clients: int, rounds: int, namespaces: int, seed: int,
            service_env: dict[str, str]) -> dict:
    stamp = int(time.time())
    pids = cluster.pids()
    base = client.Configuration()
    config.load_kube_config(config_file=str(cluster.kubeconfig), client_configuration=base)
    created: list[str] = []
    result: dict = {"clients": clients, "rounds": rounds, "namespaces": namespaces, "seed": seed,
                    "cpus": os.cpu_count(), "service_env": service_env}
    try:
        tokens = namespaces_for(cluster, f"bench-direct-{stamp}", namespaces)
        created += tokens
        names = list(tokens)
        meter = CpuMeter({"kube-apiserver": pids["kube-apiserver"], "etcd": pids["etcd"], "benchmark": os.getpid()})
        result["direct"] = run_phase(
            lambda i: DirectCaller(base, tokens[names[i % namespaces]], names[i % namespaces]),
            clients, rounds, seed, meter)

        tokens = namespaces_for(cluster, f"bench-svc-{stamp}", namespaces)
        created += tokens
        names = list(tokens)
        service = ServiceProcess(install_service_rbac(cluster), workdir / "service.log", env=service_env).start()
        try:
            meter = CpuMeter({"service": service.proc.pid, "kube-apiserver": pids["kube-apiserver"],
                              "etcd": pids["etcd"], "benchmark": os.getpid()})
            result["service"] = run_phase(
                lambda i: ServiceCaller(service.url, tokens[names[i % namespaces]], names[i % namespaces]),
                clients, rounds, seed, meter)
            service.check_alive()
        finally:
            service.stop()
    finally:
        with cluster.api_client() as api:
            for ns in created:
                client.CoreV1Api(api).delete_namespace(ns)
    result["service_over_direct"] = {
        verb: {"p50": round(result["service"][verb]["p50_ms"] / result["direct"][verb]["p50_ms"], 2),
               "p99": round(result["service"][verb]["p99_ms"] / result["direct"][verb]["p99_ms"], 2)}
        for verb in VERBS}
    result["targets"] = {verb: {"p99_ms": TARGET_P99_MS[verb],
                                "service_met": result["service"][verb]["p99_ms"] <= TARGET_P99_MS[verb],
                                "direct_met": result["direct"][verb]["p99_ms"] <= TARGET_P99_MS[verb]}
                         for verb in VERBS}
    return result


def table(result: dict) -> str:
    lines = [f"{result['clients']} clients x {result['rounds']} rounds of submit+list+get in random order, "
             f"{result['namespaces']} namespaces, {result['cpus']} CPUs"]
    for phase in ("direct", "service"):
        r = result[phase]
        cpu = ", ".join(f"{k} {v:.1f}" for k, v in r["cpu_s"].items())
        lines.append(f"{phase:8s} {r['requests_per_s']:7.1f} req/s  wall {r['wall_s']:.1f} s  cpu s: {cpu}")
        per_request = ", ".join(f"{k} {v:.1f}" for k, v in r["cpu_s_per_request_ms"].items())
        idle = ", ".join(f"{k} {v:.2f}" for k, v in r["idle_cpu_per_s"].items())
        lines.append(f"{'':8s} cpu ms per request: {per_request}; idle cpu s/s: {idle}")
    lines.append(f"{'verb':8s} {'direct p50/p99':>16s} {'service p50/p99':>17s} {'ratio p50/p99':>14s} "
                 f"{'target p99':>10s}  met")
    for verb in VERBS:
        d, s, q = result["direct"][verb], result["service"][verb], result["service_over_direct"][verb]
        lines.append(f"{verb:8s} {d['p50_ms']:7.1f}/{d['p99_ms']:7.1f}  {s['p50_ms']:7.1f}/{s['p99_ms']:8.1f}  "
                     f"{q['p50']:6.2f}/{q['p99']:6.2f}  {TARGET_P99_MS[verb]:10.0f}  "
                     f"{'yes' if result['targets'][verb]['service_met'] else 'no'}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=10, help="submits, lists and gets per client")
    parser.add_argument("--namespaces", type=int, default=10, help="the clients are spread over this many")
    parser.add_argument("--seed", type=int, default=0, help="of the order of the verbs and the names got")
    parser.add_argument("--service-env", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting for the service process (e.g. DLMCTL_SERVICE_WORKERS=2)")
    parser.add_argument("--output", type=Path, default=None, help="also write the result here (JSON)")
    parser.add_argument("--logs", type=Path, default=None, help="keep the service's log in this folder")
    args = parser.parse_args()
    service_env = dict(item.split("=", 1) for item in args.service_env)
    crds = sorted(str(p) for p in (ROOT / "charts" / "dlmctl" / "crds").glob("*.yaml"))
    with tempfile.TemporaryDirectory(prefix="bench-service-") as tmp:
        os.environ.setdefault("DLMCTL_TESTENV_NODES", "4x8")
        cluster = Cluster.start(crds=crds)
        try:
            logs = args.logs or Path(tmp)
            logs.mkdir(parents=True, exist_ok=True)
            result = measure(cluster, logs, args.clients, args.rounds, args.namespaces, args.seed, service_env)
        finally:
            cluster.cleanup()
    print(table(result), file=sys.stderr)
    print(json.dumps(result))
    if args.output:
        args.output.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
