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
from s3server import SeaweedS3  # noqa: E402
from testenv.cluster import Cluster  # noqa: E402

SPEC = {"arms": ["diffusion"], "model": {"preset": "nano"}, "data": {"unique_tokens": 8192, "seq_len": 64},
        "checkpoint": {"uri": "s3://dlmctl-test/bench"}}


def peak_rss_mb(pid: int, key: str = "VmHWM") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(cluster: Cluster, s3: SeaweedS3, count: int, workdir: Path) -> dict:
    namespace = f"bench-{count}-{int(time.time())}"
    with cluster.api_client() as api:
        client.CoreV1Api(api).create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=namespace)))
    kubeconfig = install_operator_rbac(cluster)
    # Production intervals; runs' progress is looked up in a real S3 server (no run writes metrics here).
    operator = OperatorProcess(kubeconfig, workdir / f"operator-{count}.log",
                               env={"DLMCTL_OPERATOR_RECONCILE_INTERVAL": "5", "DLMCTL_OPERATOR_PROGRESS_INTERVAL": "15",
                                    "AWS_EC2_METADATA_DISABLED": "true", "MALLOC_ARENA_MAX": "2",  # as deployed
                                    **s3.env()}).start()
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
            while jobs < count:  # polled through the operator's counter: listing 1000 jobs would load the CPU
                operator.check_alive()
                peak = max(peak, peak_rss_mb(operator.proc.pid))
                jobs = int(operator.metric("dlm_operator_jobs_created_total"))
                if time.monotonic() - started > 900:
                    raise SystemExit(f"only {jobs}/{count} jobs after 900 s; see {operator.log_path}")
                time.sleep(0.2)
            all_jobs = time.monotonic() - started
            time.sleep(5)  # status writes after the jobs: memory keeps growing for a moment
            peak = max(peak, peak_rss_mb(operator.proc.pid))
            listed = len(custom.list_namespaced_custom_object(
                JOB_GROUP, JOB_VERSION, namespace, JOB_PLURAL, label_selector=LABEL_EXPERIMENT)["items"])
            assert listed == count, f"{listed} PyTorchJobs exist, the operator counted {jobs}"
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
    parser.add_argument("--logs", type=Path, default=None, help="keep the operator's logs in this folder")
    args = parser.parse_args()
    crds = sorted(str(p) for p in (ROOT / "charts" / "dlmctl" / "crds").glob("*.yaml"))
    with tempfile.TemporaryDirectory(prefix="bench-operator-") as tmp:
        os.environ.setdefault("DLMCTL_TESTENV_NODES", "4x8")
        cluster = Cluster.start(crds=crds)
        s3 = SeaweedS3(Path(tmp) / "s3")
        try:
            s3.start()
            logs = args.logs or Path(tmp)
            logs.mkdir(parents=True, exist_ok=True)
            results = [measure(cluster, s3, n, logs) for n in args.experiments]
        finally:
            s3.stop()
            cluster.cleanup()
    for r in results:
        print(json.dumps(r))
    if args.output:
        args.output.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
