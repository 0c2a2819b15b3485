"""The README's quickstart, exactly as a newcomer runs it: both arms train for real and the comparison
shows the data-scarce regime in miniature."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def curve(run_dir: Path, event: str, field: str) -> list[float]:
    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [e[field] for e in events if e["event"] == event]


def test_the_quickstart_trains_both_arms_and_prints_the_comparison(isolated_home):
    dlmctl = Path(sys.executable).parent / "dlmctl"
    env = {k: v for k, v in os.environ.items() if k not in ("DLMCTL_BACKEND", "KUBERNETES_SERVICE_HOST")}
    done = subprocess.run([str(dlmctl), "submit", "examples/quickstart.yaml", "--backend", "local", "--wait"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "quickstart: DLM vs AR" in done.stdout

    runs = isolated_home / "experiments" / "quickstart" / "runs"
    unigram = json.loads((runs / "quickstart-ar" / "data.json").read_text())["unigram_entropy"]
    dlm_train, ar_train = curve(runs / "quickstart-dlm", "train", "train_loss"), curve(runs / "quickstart-ar", "train", "train_loss")
    dlm_val, ar_val = curve(runs / "quickstart-dlm", "eval", "val_loss"), curve(runs / "quickstart-ar", "eval", "val_loss")

    assert ar_train[-1] < unigram - 3, "AR memorises its small unique pool"
    assert dlm_train[-1] < unigram, "the diffusion model learns more than unigram statistics"
    assert dlm_val[-1] < dlm_val[0], "the diffusion model still improves on held-out text after 32 epochs"
    assert ar_val[-1] > min(ar_val), "repeated 32 times, the AR model overfits: its validation loss turns up"
