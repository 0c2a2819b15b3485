"""examples/paper/: the published sweeps as specs that validate and render to PyTorchJobs for 8-GPU nodes,
with MegaDLMs' model and data settings (checked against the numbers in the paper and MegaDLMs' configs)."""
from pathlib import Path

import pytest
import torch

from dlmctl.operator.render import job_manifests
from dlmctl.spec import load_experiment
from dlmctl.spec.sections import Arm
from dlmctl.trainer.models import build

PAPER = Path(__file__).resolve().parents[1] / "examples" / "paper"
SPECS = sorted(PAPER.glob("*.yaml"))
CITATION = "arXiv:2511.03276"


def runs(name: str):
    return load_experiment(PAPER / name).runs()


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_each_preset_cites_the_paper_and_renders_one_pytorchjob_per_run_on_8_gpu_nodes(path):
    assert CITATION in path.read_text().split("apiVersion:")[0], "the header comment cites what it reproduces"
    experiment = load_experiment(path)
    objects = job_manifests(experiment)
    jobs = [o for o in objects if o["kind"] == "PyTorchJob"]
    assert [j["metadata"]["name"] for j in jobs] == [r.name for r in experiment.runs()]
    preparations = [o for o in objects if o["kind"] == "Job"]
    assert len(preparations) == 1, "every run reads one source through one s3:// cache: one data preparation"
    assert objects[0] is preparations[0], "created before the training jobs"
    for job, run in zip(jobs, experiment.runs()):
        replicas = job["spec"]["pytorchReplicaSpecs"]
        pods = replicas["Master"]["replicas"] + replicas.get("Worker", {}).get("replicas", 0)
        assert pods == run.spec.resources.nodes
        for replica in replicas.values():
            limits = replica["template"]["spec"]["containers"][0]["resources"]["limits"]
            assert limits["nvidia.com/gpu"] == "8"
        assert run.spec.grad_accumulation * run.spec.batch.micro_batch_sequences * 8 * pods == 256, \
            "MegaDLMs' global batch: 256 sequences of 2048 tokens"


def test_the_unique_data_sweep_spends_96b_tokens_as_the_paper_budgets_times_epochs():
    by_budget = {r.spec.data.unique_tokens: r.spec.data.epochs for r in runs("unique-data-sweep.yaml")}
    assert by_budget == {500_000_000: 192, 1_000_000_000: 96, 1_500_000_000: 64, 10_000_000_000: 9.6,
                         96_000_000_000: 1}
    arms = {r.arm for r in runs("unique-data-sweep.yaml")}
    assert arms == {Arm.diffusion, Arm.autoregressive}


@pytest.mark.parametrize("name, field", [("ar-input-masking.yaml", "objective.autoregressive.input_mask_ratio"),
                                         ("ar-dropout.yaml", "model.dropout")])
def test_the_ar_ablations_sweep_their_noise_from_0_1_to_0_9_at_1b_unique_times_96(name, field):
    ablation = runs(name)
    assert {r.arm for r in ablation} == {Arm.autoregressive}
    assert [r.point[field] for r in ablation] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    assert {(r.spec.data.unique_tokens, r.spec.data.epochs) for r in ablation} == {(1_000_000_000, 96)}


def test_the_model_size_sweep_trains_both_arms_at_each_size():
    sizes = [(r.point["model.preset"], r.arm) for r in runs("model-size-sweep.yaml")]
    assert sizes == [(p, a) for p in ("110m", "350m", "1b", "1.7b") for a in (Arm.diffusion, Arm.autoregressive)]


def test_the_sparsity_sweep_sets_an_8b_total_1b_active_moe_between_the_dense_1b_and_8b():
    by_preset = {}
    for run in runs("sparsity-sweep.yaml"):
        with torch.device("meta"):  # shapes only: no 8B of memory
            model = build(run.spec.model.resolve(vocab_size=50304, max_seq_len=2048))
        by_preset.setdefault(run.point["model.preset"], set()).add(run.arm)
        by_preset[run.point["model.preset"], "params"] = (model.num_params(), model.active_params())
    assert {p: by_preset[p] for p in ("1b", "8b1a", "8b")} == {p: {Arm.diffusion, Arm.autoregressive}
                                                              for p in ("1b", "8b1a", "8b")}
    dense_1b, moe, dense_8b = (by_preset[p, "params"] for p in ("1b", "8b1a", "8b"))
    assert moe[1] < 1.01 * dense_1b[0], "a token of the MoE uses about the 1b's parameters (plus its routers)"
    assert moe[0] > 7.5 * dense_1b[0] and abs(moe[0] - dense_8b[0]) < 0.15 * dense_8b[0], "and holds an 8b's"
    assert dense_8b == (dense_8b[0], dense_8b[0])


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_presets_use_megadlms_model_and_data_settings(path):
    for run in load_experiment(path).runs():
        spec = run.spec
        shape = spec.model.resolve(vocab_size=50304, max_seq_len=spec.data.seq_len)
        if spec.model.preset in ("1b", "1.7b"):  # hf_configs/gpt2_1b_dlm and the 1.7B example: QK-norm, eps 1e-6
            assert (shape.qk_norm, shape.norm_eps) == (True, 1e-6)
        if spec.model.preset == "1b":
            assert (shape.n_layer, shape.d_model, shape.n_head, shape.d_ff, shape.tie_embeddings) == (26, 1792, 14, 4736, True)
        assert spec.data.packing == "per-epoch", "Megatron re-packs documents every epoch"
        assert spec.data.seq_len == 2048 and spec.precision == "bf16"
        if run.arm is Arm.diffusion:
            assert spec.objective.diffusion.random_length_fraction == 0.01, "MegaDLMs' --difflm-varilen-prob"
            assert (spec.objective.diffusion.eps, spec.objective.diffusion.loss_weight) == (0.0, "realized")
