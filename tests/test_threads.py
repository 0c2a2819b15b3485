"""CPU threads per trainer process: the CPUs a run is given (affinity, capped by a cgroup CPU quota) shared by
the runs running at once and their processes, with OpenMP threads that wait passively instead of spinning
on cores other processes need. A user's own OMP_NUM_THREADS wins. (Pods: tests/test_render.py.)"""
import json
import logging
import os

import pytest

from dlmctl.cli.backends import local_supervisor
from dlmctl.cli.backends.local import LocalBackend
from dlmctl.cli.backends.local_supervisor import available_cpus, cgroup_cpu_limit, trainer_env
from dlmctl.spec import experiment_from_dict, load_experiment
from test_local_backend import home, run_dir, wait_for, write_spec  # noqa: F401 (home: a fixture)

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")


@pytest.fixture
def no_thread_settings(monkeypatch):
    for name in THREAD_VARS:
        monkeypatch.delenv(name, raising=False)


def cgroup_tree(root, membership, files):
    """A fake /sys/fs/cgroup under `root` and /proc/self/cgroup saying `membership`."""
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    own = root.parent / "self-cgroup"
    own.write_text(membership)
    return own


# ---- how many CPUs -------------------------------------------------------------------------------


def test_the_tightest_cgroup_v2_quota_along_the_path_counts(tmp_path):
    root = tmp_path / "cgroup"
    own = cgroup_tree(root, "0::/user.slice/job\n", {
        "cpu.max": "max 100000\n",
        "user.slice/cpu.max": "300000 100000\n",  # 3 CPUs for the slice
        "user.slice/job/cpu.max": "150000 100000\n",  # 1.5 for the job in it
    })
    assert cgroup_cpu_limit(root, own) == 1.5
    (root / "user.slice/job/cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(root, own) == 3.0


def test_a_containers_cgroup_v1_quota_counts_and_no_quota_is_none(tmp_path):
    root = tmp_path / "cgroup"
    # inside a container its own cgroup is mounted as the controller's root: /docker/abc is not there
    own = cgroup_tree(root, "5:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n", {
        "cpu,cpuacct/cpu.cfs_quota_us": "250000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
        "memory/cpu.cfs_quota_us": "100000\n", "memory/cpu.cfs_period_us": "100000\n",  # not the cpu controller
    })
    assert cgroup_cpu_limit(root, own) == 2.5
    (root / "cpu,cpuacct/cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(root, own) is None


@pytest.mark.parametrize("affinity, quota, expected", [(8, None, 8), (8, 2.5, 2), (8, 0.5, 1), (2, 16.0, 2)])
def test_available_cpus_is_the_affinity_capped_by_the_quota(monkeypatch, affinity, quota, expected):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)))
    monkeypatch.setattr(local_supervisor, "cgroup_cpu_limit", lambda: quota)
    assert available_cpus() == expected


# ---- the trainer's environment -------------------------------------------------------------------


def run_json(tmp_path, processes: int):
    experiment = experiment_from_dict({
        "metadata": {"name": "t"},
        "spec": {"arms": ["diffusion"], "resources": {"processes_per_node": processes},
                 "batch": {"global_sequences": 8, "micro_batch_sequences": 4 if processes <= 2 else 1}},
    })
    path = tmp_path / f"run-{processes}.json"
    path.write_text(experiment.runs()[0].model_dump_json())
    return path


@pytest.mark.parametrize("cores, runs_at_once, processes", [
    (8, 1, 1), (8, 2, 1), (8, 2, 2), (16, 3, 2), (6, 4, 1), (2, 4, 2), (1, 1, 1),
])
def test_each_process_gets_its_share_of_the_cores(tmp_path, monkeypatch, no_thread_settings, cores, runs_at_once, processes):
    monkeypatch.setattr(local_supervisor, "available_cpus", lambda: cores)
    env = trainer_env(run_json(tmp_path, processes), runs_at_once=runs_at_once)
    share = max(1, cores // (runs_at_once * processes))  # whole cores per process, at least one
    assert {name: env.get(name) for name in THREAD_VARS} == {
        "OMP_NUM_THREADS": str(share), "MKL_NUM_THREADS": str(share), "OMP_WAIT_POLICY": "PASSIVE"}


def test_a_users_own_thread_settings_win(tmp_path, monkeypatch, no_thread_settings):
    monkeypatch.setattr(local_supervisor, "available_cpus", lambda: 8)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    env = trainer_env(run_json(tmp_path, 1))
    assert (env["OMP_NUM_THREADS"], env["OMP_WAIT_POLICY"]) == ("3", "PASSIVE")
    assert "MKL_NUM_THREADS" not in env, "MKL follows the user's OMP_NUM_THREADS"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert trainer_env(run_json(tmp_path, 1))["OMP_WAIT_POLICY"] == "ACTIVE"


ENV_TRAINER = """
import json, os, sys
output = sys.argv[sys.argv.index("--output") + 1]
with open(os.path.join(output, "threads.json"), "w") as f:
    json.dump({name: os.environ.get(name) for name in %r}, f)
""" % (THREAD_VARS,)


@pytest.mark.parametrize("parallel", [1, 2])
def test_runs_at_once_share_this_machines_cpus(home, tmp_path, monkeypatch, no_thread_settings, parallel):
    """Real supervisors: two runs one after the other get every CPU each, two at once half each."""
    if cgroup_cpu_limit() is not None:
        pytest.skip("the oracle counts CPUs by affinity; this machine has a cgroup CPU quota")
    (tmp_path / "env_trainer.py").write_text(ENV_TRAINER)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ["PYTHONPATH"]]))
    monkeypatch.setenv("DLMCTL_TRAINER_MODULE", "env_trainer")
    monkeypatch.setenv("DLMCTL_LOCAL_PARALLEL", str(parallel))
    backend = LocalBackend()
    backend.submit(load_experiment(write_spec(tmp_path)))
    wait_for(lambda: backend.get("tiny").status.phase == "Succeeded", "the runs to finish")
    share = str(max(1, len(os.sched_getaffinity(0)) // parallel))
    for run in ("tiny-dlm", "tiny-ar"):
        seen = json.loads((run_dir(home, "tiny", run) / "threads.json").read_text())
        assert seen == {"OMP_NUM_THREADS": share, "MKL_NUM_THREADS": share, "OMP_WAIT_POLICY": "PASSIVE"}


# ---- the trainer ---------------------------------------------------------------------------------


@pytest.fixture
def torch_threads():
    import torch

    previous = torch.get_num_threads()
    yield torch
    torch.set_num_threads(previous)


def test_the_trainer_takes_its_thread_count_from_the_environment_and_says_so_once(
        monkeypatch, caplog, torch_threads):
    from dlmctl.trainer.__main__ import apply_thread_count

    torch = torch_threads
    torch.set_num_threads(2)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with caplog.at_level(logging.INFO, logger="dlmctl.trainer"):
        assert apply_thread_count() == 1
    assert torch.get_num_threads() == 1
    assert [r.getMessage() for r in caplog.records] == [
        "1 CPU threads per process (OMP_NUM_THREADS=1, OMP_WAIT_POLICY=PASSIVE)"]

    caplog.clear()
    monkeypatch.setenv("LOCAL_RANK", "1")  # the other processes of the node stay quiet
    monkeypatch.delenv("OMP_NUM_THREADS")  # and without a setting torch keeps its own
    torch.set_num_threads(3)
    with caplog.at_level(logging.INFO, logger="dlmctl.trainer"):
        assert apply_thread_count() == 3
    assert caplog.records == []
