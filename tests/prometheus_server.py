"""A real Prometheus for tests and docs: Debian's `prometheus` package (`/usr/bin/prometheus`).

    with PrometheusServer(tmp_dir) as prom:
        prom.add_targets(ScrapeTarget("trainer", "127.0.0.1:9400", {"namespace": "lab"}))  # config reloaded
        prom.wait_for('up{job="trainer"} == 1')
        prom.query('dlm_validation_loss')        # the HTTP API's result list

It listens on a free loopback port with its own storage folder and the scrape config written here
(`scrape_interval` 1 s by default, each target's labels as target labels). Stopped by its PID: SIGTERM,
then SIGKILL after a grace period; it also dies with the process that started it (PR_SET_PDEATHSIG).
"""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from s3server import _die_with_parent
from testenv.cluster import free_ports


def prometheus_binary() -> Optional[str]:
    return shutil.which("prometheus") or (p if Path(p := "/usr/bin/prometheus").is_file() else None)


@dataclass
class ScrapeTarget:
    job: str
    address: str  # host:port serving /metrics
    labels: dict[str, str] = field(default_factory=dict)
    honor_labels: bool = False  # keep the exposed labels where they clash with target labels (the operator's namespace)


class PrometheusServer:
    def __init__(self, base_dir: str | Path, targets: tuple[ScrapeTarget, ...] = (), scrape_interval: str = "1s"):
        self.base_dir = Path(base_dir)
        self.targets, self.scrape_interval = list(targets), scrape_interval
        self.port = free_ports(1)[0]
        self.process: Optional[subprocess.Popen] = None
        binary = prometheus_binary()
        if binary is None:
            raise FileNotFoundError("the `prometheus` binary is missing: apt-get install -y prometheus")
        self.binary = binary

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def config(self) -> dict:
        jobs: dict[str, dict] = {}
        for t in self.targets:
            job = jobs.setdefault(t.job, {"job_name": t.job, "scrape_interval": self.scrape_interval,
                                          "scrape_timeout": self.scrape_interval, "honor_labels": t.honor_labels,
                                          "static_configs": []})
            job["static_configs"].append({"targets": [t.address], "labels": dict(t.labels)})
        return {"global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval},
                "scrape_configs": list(jobs.values())}

    def _write_config(self) -> Path:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        config = self.base_dir / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        return config

    def add_targets(self, *targets: ScrapeTarget, timeout: float = 30.0) -> None:
        """Scrape `targets` too: the config is rewritten and reloaded (SIGHUP) and the targets awaited."""
        self.targets += targets
        self._write_config()
        self.process.send_signal(signal.SIGHUP)
        wanted = {t.address for t in targets}
        deadline = time.monotonic() + timeout
        while wanted - {t["discoveredLabels"]["__address__"] for t in self.api("targets")["activeTargets"]}:
            if time.monotonic() > deadline:
                raise TimeoutError(f"prometheus did not take the targets {sorted(wanted)}: {self.log()[-2000:]}")
            time.sleep(0.1)

    def start(self, timeout: float = 60.0) -> "PrometheusServer":
        if self.running:
            return self
        config = self._write_config()
        command = [self.binary, f"--config.file={config}", f"--storage.tsdb.path={self.base_dir / 'data'}",
                   f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1d",
                   "--log.level=warn"]
        with open(self.base_dir / "prometheus.log", "ab") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            preexec_fn=_die_with_parent)
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.process.returncode}: {self.log()[-2000:]}")
            try:
                urllib.request.urlopen(f"{self.url}/-/ready", timeout=1)
                return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop(grace=0)
                raise TimeoutError(f"prometheus was not ready at {self.url} in {timeout:.0f}s: {self.log()[-2000:]}")
            time.sleep(0.1)

    def log(self) -> str:
        path = self.base_dir / "prometheus.log"
        return path.read_text(errors="replace") if path.exists() else ""

    # ---- the HTTP API ----------------------------------------------------------------------------------

    def api(self, path: str, **params) -> object:
        """GET /api/v1/<path>; the response's `data`. A query Prometheus refuses raises with its error."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                body = json.load(response)
        except urllib.error.HTTPError as err:
            raise ValueError(f"{path} {params}: {err.read().decode(errors='replace')}") from None
        if body.get("status") != "success":
            raise ValueError(f"{path} {params}: {body}")
        return body["data"]

    def query(self, expr: str, at: Optional[float] = None) -> list[dict]:
        """An instant query's vector: [{"metric": {...}, "value": [t, "v"]}, ...]."""
        data = self.api("query", query=expr, **({"time": at} if at is not None else {}))
        return data["result"] if data["resultType"] == "vector" else [{"metric": {}, "value": data["result"]}]

    def query_range(self, expr: str, start: float, end: float, step: float = 1.0) -> list[dict]:
        """A range query's matrix: [{"metric": {...}, "values": [[t, "v"], ...]}, ...]."""
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def label_values(self, label: str, selector: str) -> list[str]:
        """Grafana's label_values(selector, label)."""
        return self.api(f"label/{label}/values", **{"match[]": selector})

    def wait_for(self, expr: str, timeout: float = 60.0, check=lambda: None) -> list[dict]:
        """Poll until the instant query `expr` returns a series; `check()` may fail the wait early."""
        deadline = time.monotonic() + timeout
        while True:
            check()
            result = self.query(expr)
            if result:
                return result
            if time.monotonic() > deadline:
                raise TimeoutError(f"no series for {expr} after {timeout:.0f}s; targets: {self.api('targets')}")
            time.sleep(0.25)

    # ---- lifecycle -------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM by PID, SIGKILL after `grace` seconds."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        if grace > 0:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(grace)
                return
            except subprocess.TimeoutExpired:
                pass
        process.kill()
        process.wait()

    def __enter__(self) -> "PrometheusServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
