"""Build the test control plane's binaries from upstream Go modules.

Stdlib only, so ``tests/testenv/build`` runs with any python3.

Three Go modules live in this directory (their go.mod/go.sum are committed):

* ``tests/testenv/go.mod`` -- k8s.io/kubernetes (kube-apiserver,
  kube-controller-manager, kube-scheduler) with every k8s.io staging module
  replaced by its published v0.Y.Z, plus etcd (``./etcd`` wrapper), kwok and
  helm, which are built against the same k8s.io/* v0.36 libraries and so share
  the compiled packages.
* ``tests/testenv/training-operator/go.mod`` -- the Kubeflow training-operator
  (k8s.io/* v0.31, controller-runtime v0.19).
* ``tests/testenv/kueue/go.mod`` -- Kueue's ``cmd/kueue``, unmodified (k8s.io/*
  v0.35, controller-runtime v0.23).

Binaries go to ``$DLMCTL_TESTENV_CACHE`` (default ``~/.cache/dlmctl/testenv``)
``/<k8s-version>/bin``.  Each module group writes a stamp keyed by the hash of
its go.mod, go.sum, Go sources, versions, Go version and build flags; when the
stamp matches and the binaries exist the build is skipped (milliseconds).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

try:  # imported as a package (tests/ on sys.path) or as a script's sibling
    from . import versions as V
except ImportError:  # pragma: no cover
    import versions as V  # type: ignore

HERE = Path(__file__).resolve().parent
TRAINING_OPERATOR_DIR = HERE / "training-operator"
KUEUE_DIR = HERE / "kueue"

KUBE_BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler")
MAIN_BINARIES = KUBE_BINARIES + ("etcd", "kwok", "helm", "kubectl")
TRAINING_OPERATOR_BINARY = "training-operator"
KUEUE_BINARY = "kueue"
KUEUE_PACKAGE = "sigs.k8s.io/kueue/cmd/kueue"
ALL_BINARIES = MAIN_BINARIES + (TRAINING_OPERATOR_BINARY, KUEUE_BINARY)

# Go package for each binary of the main module.
MAIN_PACKAGES = {
    "kube-apiserver": "k8s.io/kubernetes/cmd/kube-apiserver",
    "kube-controller-manager": "k8s.io/kubernetes/cmd/kube-controller-manager",
    "kube-scheduler": "k8s.io/kubernetes/cmd/kube-scheduler",
    "etcd": "./etcd",
    "kwok": "sigs.k8s.io/kwok/cmd/kwok",
    "helm": "helm.sh/helm/v4/cmd/helm",
    "kubectl": "k8s.io/kubernetes/cmd/kubectl",  # for people debugging a cluster by hand
}
MAIN_TOOLS = [p for p in MAIN_PACKAGES.values() if not p.startswith("./")]

# Release metadata (from the module proxy's .info) used for version ldflags.
# The proxy this was generated against serves no VCS origin, so no git commit.
KUBE_BUILD_DATE = "2026-07-22T18:07:38Z"
KUEUE_BUILD_DATE = "2026-03-31T10:34:08Z"


def cache_root() -> Path:
    env = os.environ.get("DLMCTL_TESTENV_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "dlmctl" / "testenv"


def bin_dir() -> Path:
    return cache_root() / V.KUBERNETES / "bin"


def crd_dir() -> Path:
    return cache_root() / V.KUBERNETES / "training-operator-manifests"


def kueue_manifest_dir() -> Path:
    return cache_root() / V.KUBERNETES / "kueue-manifests"


def binary(name: str) -> Path:
    return bin_dir() / name


def go_binary() -> str:
    env = os.environ.get("GO")
    if env:
        return env
    found = shutil.which("go")
    if found:
        return found
    for cand in ("/usr/local/go/bin/go", "/usr/lib/go/bin/go"):
        if os.access(cand, os.X_OK):
            return cand
    raise RuntimeError("no Go toolchain found (set $GO or put go on PATH)")


def go_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.setdefault("GOTOOLCHAIN", "local")
    env["CGO_ENABLED"] = "0"
    # The go.sum files are committed; everything is verified against them.
    # -buildvcs=false: the sources come from the module cache, not a checkout.
    env["GOFLAGS"] = "-mod=readonly -buildvcs=false"
    if extra:
        env.update(extra)
    return env


def jobs() -> int:
    env = os.environ.get("DLMCTL_TESTENV_BUILD_JOBS")
    if env:
        return max(1, int(env))
    return max(1, min(os.cpu_count() or 1, 2))


def main_ldflags() -> str:
    major, minor = V.KUBERNETES.lstrip("v").split(".")[:2]
    flags = []
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {pkg}.gitVersion={V.KUBERNETES}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
            f"-X {pkg}.buildDate={KUBE_BUILD_DATE}",
        ]
    flags += [
        f"-X sigs.k8s.io/kwok/pkg/consts.Version={V.KWOK.lstrip('v')}",
        f"-X sigs.k8s.io/kwok/pkg/consts.KubeVersion={V.KUBERNETES.lstrip('v')}",
        f"-X helm.sh/helm/v4/internal/version.version={V.HELM}",
        "-X helm.sh/helm/v4/internal/version.gitTreeState=clean",
        "-s",
        "-w",
    ]
    return " ".join(flags)


def training_operator_ldflags() -> str:
    return "-s -w"


def kueue_ldflags() -> str:
    # GitCommit emptied (upstream's default is a placeholder): the module proxy serves no VCS origin
    return (f"-X sigs.k8s.io/kueue/pkg/version.GitVersion={V.KUEUE} "
            "-X sigs.k8s.io/kueue/pkg/version.GitCommit= "
            f"-X sigs.k8s.io/kueue/pkg/version.BuildDate={KUEUE_BUILD_DATE} -s -w")


@dataclass
class Group:
    name: str
    moddir: Path
    binaries: tuple
    packages: list
    ldflags: str
    sources: list = field(default_factory=list)

    def fingerprint(self, go_version: str) -> str:
        h = hashlib.sha256()
        for p in [self.moddir / "go.mod", self.moddir / "go.sum", *self.sources,
                  HERE / "versions.py"]:
            h.update(p.name.encode())
            h.update(p.read_bytes())
        h.update(go_version.encode())
        h.update(self.ldflags.encode())
        h.update(" ".join(self.packages).encode())
        return h.hexdigest()


def groups() -> list[Group]:
    return [
        Group("main", HERE, MAIN_BINARIES, [MAIN_PACKAGES[b] for b in MAIN_BINARIES],
              main_ldflags(), sources=sorted((HERE / "etcd").glob("*.go"))),
        Group("training-operator", TRAINING_OPERATOR_DIR, (TRAINING_OPERATOR_BINARY,), ["."],
              training_operator_ldflags(), sources=sorted(TRAINING_OPERATOR_DIR.glob("*.go"))),
        Group("kueue", KUEUE_DIR, (KUEUE_BINARY,), [KUEUE_PACKAGE], kueue_ldflags()),
    ]


class PeakRSS:
    """Samples the summed RSS of a process tree (all go/compile/link children)."""

    def __init__(self, root_pid: int, interval: float = 0.5):
        self.root = root_pid
        self.interval = interval
        self.peak_kib = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    st = f.read()
                ppid = int(st.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d))
        out, todo = [], [self.root]
        while todo:
            p = todo.pop()
            out.append(p)
            todo.extend(children.get(p, []))
        return out

    def _run(self):
        while not self._stop.is_set():
            total = 0
            for pid in self._tree():
                try:
                    with open(f"/proc/{pid}/status") as f:
                        for line in f:
                            if line.startswith("VmRSS:"):
                                total += int(line.split()[1])
                                break
                except OSError:
                    pass
            self.peak_kib = max(self.peak_kib, total)
            self._stop.wait(self.interval)


def log(msg: str) -> None:
    print(f"[testenv-build] {msg}", file=sys.stderr, flush=True)


def _run_measured(cmd: list[str], cwd: Path, env: dict) -> tuple[float, int, int]:
    """Run cmd; return (seconds, peak tree RSS KiB, max single-process RSS KiB)."""
    import resource

    t0 = time.monotonic()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.Popen(cmd, cwd=cwd, env=env)
    with PeakRSS(proc.pid) as peak:
        rc = proc.wait()
    dt = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if rc != 0:
        raise subprocess.CalledProcessError(rc, cmd)
    return dt, peak.peak_kib, max(before, after)


@contextlib.contextmanager
def _lock():
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".build.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _go_version(go: str) -> str:
    return subprocess.run([go, "version"], capture_output=True, text=True, check=True,
                          env=go_env()).stdout.strip()


def _copy_manifests(go: str, module: str, moddir: Path, dst: Path, files: dict[str, str]) -> None:
    """Copy files and folders (``{source in the module: name in dst}``) of a module in the module cache
    to ``dst``, replacing it as a whole."""
    out = subprocess.run([go, "list", "-m", "-f", "{{.Dir}}", module], cwd=moddir, env=go_env(),
                         capture_output=True, text=True, check=True).stdout.strip()
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=".manifests-"))
    for src, name in files.items():
        (shutil.copytree if (Path(out) / src).is_dir() else shutil.copy)(Path(out) / src, tmp / name)
    for p in [tmp, *tmp.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)


def _copy_training_operator_manifests(go: str) -> None:
    """The training-operator's CRDs and webhook manifest."""
    _copy_manifests(go, "github.com/kubeflow/training-operator", TRAINING_OPERATOR_DIR, crd_dir(),
                    {"manifests/base/crds": "crds", "manifests/base/webhook/manifests.yaml": "webhook.yaml"})


def _copy_kueue_manifests(go: str) -> None:
    """Kueue's CRDs (bases, and the kustomize patches that give five of them a conversion webhook), its webhook
    configurations and the kustomization that patches those (namespaceSelectors)."""
    _copy_manifests(go, "sigs.k8s.io/kueue", KUEUE_DIR, kueue_manifest_dir(),
                    {"config/components/crd": "crd",
                     "config/components/webhook/manifests.yaml": "webhook.yaml",
                     "config/components/webhook/kustomization.yaml": "webhook-kustomization.yaml"})


MONITORING_CRDS = ("servicemonitors", "podmonitors")


def monitoring_crds() -> list[Path]:
    """The prometheus-operator's ServiceMonitor and PodMonitor CRDs at the pinned version, from its Go module
    (downloaded through the module proxy once, then cached next to the binaries)."""
    dst = cache_root() / f"prometheus-operator-{V.PROMETHEUS_OPERATOR}"
    files = [dst / f"monitoring.coreos.com_{name}.yaml" for name in MONITORING_CRDS]
    if all(f.exists() for f in files):
        return files
    with _lock():
        if not all(f.exists() for f in files):
            module = f"github.com/prometheus-operator/prometheus-operator@{V.PROMETHEUS_OPERATOR}"
            with tempfile.TemporaryDirectory() as cwd:  # outside any module: go.sum checked against the sum database
                out = subprocess.run([go_binary(), "mod", "download", "-json", module], cwd=cwd, env=go_env(),
                                     capture_output=True, text=True, check=True).stdout
            src = Path(json.loads(out)["Dir"]) / "example" / "prometheus-operator-crd"
            dst.mkdir(parents=True, exist_ok=True)
            for f in files:
                tmp = f.with_suffix(".tmp")
                shutil.copyfile(src / f.name, tmp)
                tmp.chmod(0o644)
                os.replace(tmp, f)
    return files


def up_to_date() -> bool:
    """Cheap check (no go invocation): all binaries and stamps present and matching."""
    try:
        stamps = json.loads((bin_dir() / ".stamps.json").read_text())
    except (OSError, ValueError):
        return False
    go_version = stamps.get("go_version", "")
    try:  # a different toolchain means a rebuild; without one, trust the stamp
        go_version = _go_version(go_binary())
    except (RuntimeError, OSError, subprocess.CalledProcessError):
        pass
    for g in groups():
        if stamps.get(g.name) != g.fingerprint(go_version):
            return False
        if not all(binary(b).exists() for b in g.binaries):
            return False
    return ((crd_dir() / "crds" / "kubeflow.org_pytorchjobs.yaml").exists()
            and (kueue_manifest_dir() / "crd" / "bases" / "kueue.x-k8s.io_workloads.yaml").exists()
            and (kueue_manifest_dir() / "webhook-kustomization.yaml").exists())


def build(force: bool = False, quiet: bool = False) -> Path:
    """Build whatever is missing or stale. Returns the bin directory."""
    t_start = time.monotonic()
    if not force and up_to_date():
        if not quiet:
            log(f"binaries up to date in {bin_dir()} ({time.monotonic() - t_start:.2f}s)")
        return bin_dir()
    go = go_binary()
    with _lock():
        bdir = bin_dir()
        bdir.mkdir(parents=True, exist_ok=True)
        go_version = _go_version(go)
        stamps_path = bdir / ".stamps.json"
        try:
            stamps = json.loads(stamps_path.read_text())
        except (OSError, ValueError):
            stamps = {}
        if stamps.get("go_version") != go_version:
            stamps = {"go_version": go_version}
        total_peak = 0
        total_proc = 0
        for g in groups():
            fp = g.fingerprint(go_version)
            have = all(binary(b).exists() for b in g.binaries)
            if not force and have and stamps.get(g.name) == fp:
                log(f"{g.name}: up to date")
                continue
            stamps.pop(g.name, None)
            stamps_path.write_text(json.dumps(stamps, indent=1))
            tmp_out = Path(tempfile.mkdtemp(dir=bdir, prefix=".out-"))
            try:
                cmd = [go, "build", "-p", str(jobs()), "-trimpath",
                       "-ldflags", g.ldflags]
                if len(g.packages) == 1:
                    cmd += ["-o", str(tmp_out / g.binaries[0])]
                else:
                    cmd += ["-o", str(tmp_out) + "/"]
                cmd += g.packages
                log(f"{g.name}: building {', '.join(g.binaries)} (go build -p {jobs()}) ...")
                dt, peak, maxproc = _run_measured(cmd, g.moddir, go_env())
                total_peak = max(total_peak, peak)
                total_proc = max(total_proc, maxproc)
                log(f"{g.name}: built in {dt:.0f}s; peak RSS of the build tree "
                    f"{peak / 1024:.0f} MiB")
                for b in g.binaries:
                    os.replace(tmp_out / b, bdir / b)
            finally:
                shutil.rmtree(tmp_out, ignore_errors=True)
            stamps[g.name] = fp
            stamps_path.write_text(json.dumps(stamps, indent=1))
        _copy_training_operator_manifests(go)
        _copy_kueue_manifests(go)
    log(f"done in {time.monotonic() - t_start:.0f}s -> {bin_dir()}"
        + (f" (peak build-tree RSS {total_peak / 1024:.0f} MiB, largest single process "
           f"{total_proc / 1024:.0f} MiB)" if total_peak else ""))
    return bin_dir()


# --------------------------------------------------------------------------
# Regenerating go.mod/go.sum (maintainers only; needs the Go module proxy).
# --------------------------------------------------------------------------

def _proxy() -> str:
    for entry in re.split(r"[,|]", os.environ.get("GOPROXY", "https://proxy.golang.org")):
        if entry.startswith("http"):
            return entry.rstrip("/")
    return "https://proxy.golang.org"


def staging_modules(k8s_version: str = V.KUBERNETES) -> list[str]:
    """Every k8s.io/* module k8s.io/kubernetes requires at v0.0.0 (its staging repos)."""
    url = f"{_proxy()}/k8s.io/kubernetes/@v/{k8s_version}.mod"
    with urllib.request.urlopen(url, timeout=60) as r:
        text = r.read().decode()
    return sorted(set(re.findall(r"^\s*(?:require\s+)?(k8s\.io/\S+) v0\.0\.0\s*$", text, re.M)))


def regen_gomod() -> None:
    go = go_binary()
    env = go_env({"GOFLAGS": "-mod=mod -buildvcs=false",
                  "GOSUMDB": os.environ.get("GOSUMDB", "off")})
    staging = V.staging_version()
    mods = staging_modules()
    lines = ["module dlmctl.local/testenv", "", "go 1.26.0", "",
             f"require k8s.io/kubernetes {V.KUBERNETES}", "",
             "// Every k8s.io staging module k8s.io/kubernetes requires at v0.0.0,",
             f"// replaced with its published {staging} (generated by"
             " tests/testenv/build --regen-gomod).",
             "replace ("]
    lines += [f"\t{m} => {m} {staging}" for m in mods]
    lines += [")", "", "tool ("] + [f"\t{t}" for t in sorted(MAIN_TOOLS)] + [")", ""]
    (HERE / "go.mod").write_text("\n".join(lines))
    (HERE / "go.sum").write_text("")
    subprocess.run([go, "get", f"k8s.io/kubernetes@{V.KUBERNETES}",
                    f"go.etcd.io/etcd/server/v3@{V.ETCD}",
                    f"sigs.k8s.io/kwok@{V.KWOK}", f"helm.sh/helm/v4@{V.HELM}"],
                   cwd=HERE, env=env, check=True)
    subprocess.run([go, "mod", "tidy"], cwd=HERE, env=env, check=True)

    tod = TRAINING_OPERATOR_DIR
    (tod / "go.mod").write_text(
        "module dlmctl.local/testenv/training-operator\n\ngo 1.24\n\n"
        f"require github.com/kubeflow/training-operator {V.TRAINING_OPERATOR}\n")
    (tod / "go.sum").write_text("")
    subprocess.run([go, "mod", "tidy"], cwd=tod, env=env, check=True)

    (KUEUE_DIR / "go.mod").write_text(
        "module dlmctl.local/testenv/kueue\n\ngo 1.25.0\n\n"
        f"require sigs.k8s.io/kueue {V.KUEUE}\n\ntool {KUEUE_PACKAGE}\n")
    (KUEUE_DIR / "go.sum").write_text("")
    subprocess.run([go, "mod", "tidy"], cwd=KUEUE_DIR, env=env, check=True)
    log("go.mod/go.sum regenerated; review the diff and rebuild")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="tests/testenv/build",
        description="Build the test control plane (kube-apiserver, kube-controller-manager, "
                    "kube-scheduler, etcd, kwok, helm, training-operator, kueue) from Go modules.")
    ap.add_argument("--force", action="store_true", help="rebuild even if the stamps match")
    ap.add_argument("--check", action="store_true",
                    help="exit 0 if everything is built and up to date, 1 otherwise")
    ap.add_argument("--print-bin-dir", action="store_true", help="print the bin directory")
    ap.add_argument("--regen-gomod", action="store_true",
                    help="regenerate go.mod/go.sum from versions.py (needs the module proxy)")
    args = ap.parse_args(argv)
    if args.print_bin_dir:
        print(bin_dir())
        return 0
    if args.check:
        return 0 if up_to_date() else 1
    if args.regen_gomod:
        regen_gomod()
        return 0
    try:
        build(force=args.force)
    except subprocess.CalledProcessError as e:
        log(f"FAILED: {' '.join(map(str, e.cmd))} (exit {e.returncode})")
        return 1
    for b in ALL_BINARIES:
        print(binary(b))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
