"""`dlmctl submit --wait` on a laptop with the real trainer: both arms train, the comparison is printed,
and a checkpoint URI on S3 works the same as a local one."""
import json
from pathlib import Path

import pytest
import yaml

from dlmctl.cli.app import main
from dlmctl.cli.backends.local import LocalBackend
from trainer_runs import TINY, merge

pytestmark = pytest.mark.slow


@pytest.fixture
def home(isolated_home, monkeypatch, tmp_path):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for knob in ("DLMCTL_BACKEND", "DLMCTL_TRAINER_MODULE", "DLMCTL_LOCAL_LAUNCHER", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(knob, raising=False)
    yield isolated_home
    backend = LocalBackend()
    for summary in backend.list():
        if summary.phase not in ("Succeeded", "Failed", "Cancelled"):
            backend.cancel(summary.name)


def spec_file(tmp_path, name, **overrides) -> Path:
    document = {"apiVersion": "dlmctl.io/v1alpha1", "kind": "Experiment", "metadata": {"name": name},
                "spec": merge(TINY, {"data": {"epochs": 4}, **overrides})}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def test_submit_wait_trains_both_arms_and_prints_the_comparison(home, tmp_path, capsys):
    code = main(["submit", str(spec_file(tmp_path, "laptop")), "--wait"])
    out = capsys.readouterr().out

    assert code == 0, out
    assert "laptop-dlm" in out and "laptop-ar" in out and "DLM vs AR" in out
    runs = home / "experiments" / "laptop" / "runs"
    curves = {}
    for run in ("laptop-dlm", "laptop-ar"):
        events = [json.loads(line) for line in (runs / run / "metrics.jsonl").read_text().splitlines()]
        curves[run] = [e["train_loss"] for e in events if e["event"] == "train"]
        assert curves[run][-1] < curves[run][0] - 0.5, f"{run} learns"
    unigram = json.loads((runs / "laptop-ar" / "data.json").read_text())["unigram_entropy"]
    assert curves["laptop-ar"][-1] < unigram, "AR learns more than unigram statistics"
    assert main(["get", "laptop", "-o", "json"]) == 0
    status = json.loads(capsys.readouterr().out)["status"]
    assert status["phase"] == "Succeeded"
    assert {r["phase"] for r in status["runs"]} == {"Succeeded"}

    assert main(["export", "laptop-ar", "-o", str(tmp_path / "exported")]) == 0
    assert {p.name for p in (tmp_path / "exported").iterdir()} == {  # a transformers Llama (tests/test_export_hf.py)
        "model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json"}
    for run in ("laptop-dlm", "laptop-ar"):
        capsys.readouterr()
        assert main(["sample", run, "--prompt", "def ", "--max-new-tokens", "8"]) == 0
        assert capsys.readouterr().out.rstrip("\n"), f"{run} generates text (a tiny model may well generate spaces)"


@pytest.mark.s3
def test_submit_with_an_s3_checkpoint_uri_checkpoints_and_exports_to_the_bucket(home, tmp_path, capsys, s3_server,
                                                                                 s3_uri):
    spec = spec_file(tmp_path, "bucket", arms=["autoregressive"],
                     checkpoint={"uri": s3_uri, "interval_steps": 8, "endpoint_url": s3_server.endpoint_url})
    code = main(["submit", str(spec), "--wait"])
    assert code == 0, capsys.readouterr().out

    fs = s3_server.filesystem()
    prefix = s3_uri.removeprefix("s3://") + "/bucket-ar"
    saved = sorted(p.split("/")[-2] for p in fs.glob(f"{prefix}/step-*/manifest.json"))
    assert saved == ["step-00000056", "step-00000064"], "retention keeps the last 2 of 8 checkpoints"
    assert fs.cat(f"{prefix}/latest").decode().strip() == saved[-1]
    assert fs.exists(f"{prefix}/export/model.safetensors")
    log = (home / "experiments" / "bucket" / "runs" / "bucket-ar" / "train.log").read_text()
    assert s3_server.env()["AWS_SECRET_ACCESS_KEY"] not in log
