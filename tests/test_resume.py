"""A run killed at any instant comes back exactly where it was: same loss curve, same final weights."""
import random
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from trainer_runs import events, kill_tree, launch, losses, start_pods, tiny_run, wait_for_pods, wait_until

pytestmark = pytest.mark.slow


def final_weights(out):
    return load_file(str(out / "export" / "model.safetensors"))


def kill_when(proc, condition, timeout=300):
    wait_until(proc, condition, timeout)
    kill_tree(proc.pid)
    proc.wait()


def assert_same_run(reference, resumed, exact=True):
    """Bitwise on CPU fp32 for the same world size; another world size sums gradients in another order."""
    ref, got = losses(reference), losses(resumed)  # a resumed run logs steps again: the latest value counts
    assert sorted(got) == sorted(ref)
    for step in ref:
        expected = ref[step] if exact else pytest.approx(ref[step], rel=1e-5)
        assert got[step] == expected, f"step {step}: {got[step]} != {ref[step]}"
    ref_w, got_w = final_weights(reference), final_weights(resumed)
    assert ref_w.keys() == got_w.keys()
    for name in ref_w:
        same = torch.equal(ref_w[name], got_w[name]) if exact else torch.allclose(ref_w[name], got_w[name], atol=1e-5)
        assert same, name


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "out"
    launch(tiny_run("diffusion"), out)
    return out


def test_killed_at_random_moments_the_run_resumes_to_the_uninterrupted_result(tmp_path, reference):
    run = tiny_run("diffusion")
    out = tmp_path / "out"
    chance = random.Random(7)
    for kill in range(3):
        proc = launch(run, out, wait=False)
        seen = len(events(out, "train"))
        target = seen + chance.randint(2, 7)  # some kills land mid-step, some mid-save, some mid-upload
        kill_when(proc, lambda: len(events(out, "train")) >= target)
        time.sleep(chance.random() * 0.5)
    launch(run, out)

    assert_same_run(reference, out)
    assert len(events(out, "start")) == 4


def test_a_tampered_newest_checkpoint_is_skipped_for_the_previous_one(tmp_path, reference):
    run = tiny_run("diffusion")
    out = tmp_path / "out"
    proc = launch(run, out, wait=False)
    checkpoints = out / "checkpoints"
    kill_when(proc, lambda: len(list(checkpoints.glob("step-*/manifest.json"))) >= 2)
    newest = sorted(m.parent for m in checkpoints.glob("step-*/manifest.json"))[-1]
    victim = next(p for p in sorted(newest.rglob("*.pt")))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    launch(run, out)

    [_, resumed] = events(out, "start")
    assert resumed["step"] < int(newest.name.split("-")[1]), "the tampered checkpoint was not used"
    assert_same_run(reference, out)


@pytest.mark.s3
def test_killed_while_its_upload_waits_for_a_stopped_s3_server_the_run_resumes_from_s3(
        tmp_path, reference, s3_outage_server, monkeypatch):
    from s3_fixtures import use_s3_server

    use_s3_server(s3_outage_server, monkeypatch)
    uri = f"s3://{s3_outage_server.bucket}/outage"
    run = tiny_run("diffusion", checkpoint={"uri": uri, "endpoint_url": s3_outage_server.endpoint_url})
    out = tmp_path / "out"
    proc = launch(run, out, wait=False)
    queued = lambda n: (out.parent / "out.log").read_text().count("queued for upload") >= n
    saved = lambda n: (out.parent / "out.log").read_text().count("saved to s3://") >= n
    wait_until(proc, lambda: saved(1))
    s3_outage_server.stop(grace=0)
    kill_when(proc, lambda: queued(2))  # the second checkpoint is staged, its upload retrying
    s3_outage_server.start()
    launch(run, out)

    [_, resumed] = events(out, "start")
    assert resumed["step"] == run.spec.checkpoint.interval_steps, "resumed from the checkpoint that reached S3"
    assert_same_run(reference, out)
    fs = s3_outage_server.filesystem()
    assert fs.exists(f"{uri.removeprefix('s3://')}/{run.name}/export/model.safetensors")


def test_pods_with_their_own_disks_resume_from_the_shared_store(tmp_path, reference):
    """Two pods (one process each, as a PyTorchJob without torchrun runs them), each with its own local
    disk, checkpointing to one store: killed together, they resume to the uninterrupted result."""
    run = tiny_run("diffusion", checkpoint={"uri": str(tmp_path / "bucket")})
    outputs = [tmp_path / "pod0", tmp_path / "pod1"]
    pods = start_pods(run, outputs)
    checkpoints = tmp_path / "bucket" / run.name
    kill_when(pods[0], lambda: len(list(checkpoints.glob("step-*/manifest.json"))) >= 2)
    kill_tree(pods[1].pid)
    pods[1].wait()
    wait_for_pods(start_pods(run, outputs), outputs)

    [_, resumed] = events(tmp_path / "pod0", "start")
    assert resumed["step"] >= 8
    assert_same_run(reference, tmp_path / "pod0", exact=False)


def test_a_preempted_run_checkpoints_where_it_stopped_and_resumes_there(tmp_path, reference):
    """SIGTERM (a preemption, `dlmctl cancel`) finishes the step, saves a checkpoint off the interval, exits."""
    run = tiny_run("diffusion")
    out = tmp_path / "out"
    proc = launch(run, out, wait=False)
    wait_until(proc, lambda: len(events(out, "train")) >= 5)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to its workers
    assert proc.wait(timeout=120) != 0, "a preempted run does not report success"
    stopped_at = max(losses(out))
    launch(run, out)

    [_, resumed] = events(out, "start")
    assert resumed["step"] == stopped_at, "nothing trained before the signal is lost"
    assert_same_run(reference, out)
