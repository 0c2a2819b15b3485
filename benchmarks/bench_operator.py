"""The operator under load: N Experiments submitted at once to the test control plane.

Starts the control plane of tests/testenv (real kube-apiserver, scheduler, training-operator, KWOK
nodes) with the Experiment CRD, runs `python -m dlmctl.operator` as a separate process with its
least-privilege ServiceAccount, submits N one-run Experiments from 8 client threads and reports:

- `submit_s`: creating the N Experiment objects (the clients' side, for reference);
- `all_jobs_s`: from the first submission until all N PyTorchJobs exist (targets: N=1000 in <= 60 s);
- `jobs_per_s`: N / all_jobs_s;
- `peak_rss_mb`: the operator process's peak resident memory (the kernel's VmHWM; target <= 300 MB);
- `baseline_rss_mb`: its resident memory before the first submission, for contrast.

    python benchmarks/bench_operator.py [--experiments 100 1000] [--output FILE.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from kubernetes import client  # noqa: E402

from dlmctl.operator.jobs import JOB_GROUP, JOB_PLURAL, JOB_VERSION, LABEL_EXPERIMENT  # noqa: E402
from dlmctl.spec import GROUP, PLURAL, VERSION  # noqa: E402
from operator_harness import OperatorProcess, install_operator_rbac  # noqa: E402
from testenv.cluster import Cluster  # noqa: E402

SPEC = {"arms": ["diffusion"], "model": {"preset": "nano"}, "data": {"unique_tokens": 8192, "seq_len": 64},
        "checkpoint": {"uri": "s3://bench/operator"}}


def peak_rss_mb(pid: int, key: str = "VmHWM") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(cluster: Cluster, count: int, workdir: Path) -> dict:
    namespace = f"bench-{count}-{int(time.time())}"
    with cluster.api_client() as api:
        client.CoreV1Api(api).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    kubeconfig = install_operator_rbac(cluster)
    # The benchmark measures the operator, not S3: progress reads are off (no run ever starts training).
    operator = OperatorProcess(kubeconfig, workdir / f"operator-{count}.log",
                               env={"DLMCTL_OPERATOR_RECONCILE_INTERVAL": "5",
                                    "DLMCTL_OPERATOR_PROGRESS_INTERVAL": "3600",
                                    "AWS_ENDPOINT_URL": "http://127.0.0.1:1"}).start()
    try:
        time.sleep(2)
        baseline = peak_rss_mb(operator.proc.pid, "VmRSS")
        with cluster.api_client() as api:
            custom = client.CustomObjectsApi(api)

            def submit(i: int) -> None:
                body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Experiment",
                        "metadata": {"name": f"e{i:05d}"}, "spec": SPEC}
                custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

            started = time.monotonic()
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(submit, range(count)))
            submitted = time.monotonic() - started
            jobs, peak = 0, 0.0
            while jobs < count:
                operator.check_alive()
                peak = max(peak, peak_rss_mb(operator.proc.pid))
                jobs = len(custom.list_namespaced_custom_object(
                    JOB_GROUP, JOB_VERSION, namespace, JOB_PLURAL, label_selector=LABEL_EXPERIMENT)["items"])
                if time.monotonic() - started > 600:
                    raise SystemExit(f"only {jobs}/{count} jobs after 600 s; see {operator.log_path}")
                time.sleep(0.5)
            all_jobs = time.monotonic() - started
            time.sleep(5)  # status writes after the jobs: memory keeps growing for a moment
            peak = max(peak, peak_rss_mb(operator.proc.pid))
    finally:
        operator.stop()
        with cluster.api_client() as api:
            client.CoreV1Api(api).delete_namespace(namespace)
    return {"experiments": count, "submit_s": round(submitted, 2), "all_jobs_s": round(all_jobs, 2),
            "jobs_per_s": round(count / all_jobs, 1), "peak_rss_mb": round(peak, 1),
            "baseline_rss_mb": round(baseline, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--output", type=Path, default=None, help="also write the results here (JSON)")
    args = parser.parse_args()
    crds = sorted(str(p) for p in (ROOT / "charts" / "dlmctl" / "crds").glob("*.yaml"))
    with tempfile.TemporaryDirectory(prefix="bench-operator-") as tmp:
        os.environ.setdefault("DLMCTL_TESTENV_NODES", "4x8")
        cluster = Cluster.start(crds=crds)
        try:
            results = [measure(cluster, n, Path(tmp)) for n in args.experiments]
        finally:
            cluster.cleanup()
    for r in results:
        print(json.dumps(r))
    if args.output:
        args.output.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
