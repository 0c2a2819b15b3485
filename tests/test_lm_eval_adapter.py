"""lm-evaluation-harness scores a dlmctl model through the adapter, from local task files, offline."""
import json
import math

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from dlmctl.spec import ModelShape  # noqa: E402
from dlmctl.trainer.lm_eval_adapter import DlmctlLM  # noqa: E402
from dlmctl.trainer.scoring import loglikelihood  # noqa: E402


class ByteTokenizer:
    eos_id, mask_id, vocab_size = 256, 257, 258

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_model():
    from dlmctl.trainer.models import Transformer

    torch.manual_seed(0)
    return Transformer(ModelShape(n_layer=1, d_model=32, n_head=2, n_kv_head=2, d_ff=64, vocab_size=258, max_seq_len=64)).eval()


DOCS = [
    {"question": "2 + 2 =", "choices": [" 4", " 5", " 22"], "label": 0, "answer": "4"},
    {"question": "The sky is", "choices": [" blue", " green", " loud"], "label": 0, "answer": "blue"},
    {"question": "Cats say", "choices": [" moo", " meow", " quack"], "label": 1, "answer": "meow"},
]


def write_tasks(folder, docs):
    folder.mkdir(exist_ok=True)
    data = folder / "toy.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    common = f"""dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
doc_to_text: "{{{{question}}}}"
"""
    (folder / "toy_choice.yaml").write_text(common + """task: dlmctl_toy_choice
output_type: multiple_choice
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
""")
    (folder / "toy_generate.yaml").write_text(common + """task: dlmctl_toy_generate
output_type: generate_until
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
metric_list:
  - metric: exact_match
""")
    return folder


@pytest.fixture
def task_dir(tmp_path):
    return write_tasks(tmp_path, DOCS)


class Recording(DlmctlLM):
    """The adapter, remembering what it answered lm-eval, by document."""

    def loglikelihood(self, requests):
        scores = super().loglikelihood(requests)
        for request, (score, _) in zip(requests, scores):
            self.scores.setdefault(request.doc_id, {})[request.idx] = score
        return scores

    def generate_until(self, requests):
        outputs = super().generate_until(requests)
        self.generated.update({request.doc_id: out for request, out in zip(requests, outputs)})
        return outputs


def evaluate(lm, folder):
    lm.scores, lm.generated = {}, {}
    results = lm_eval.simple_evaluate(
        model=lm, tasks=["dlmctl_toy_choice", "dlmctl_toy_generate"],
        task_manager=TaskManager(include_path=str(folder), include_defaults=False), bootstrap_iters=0, log_samples=False,
    )["results"]
    return results["dlmctl_toy_choice"]["acc,none"], results["dlmctl_toy_generate"]["exact_match,none"]


@pytest.mark.parametrize("arm", ["autoregressive", "diffusion"])
def test_simple_evaluate_scores_local_tasks_offline_from_what_the_adapter_answered(tmp_path, arm):
    """Accuracy is the share of documents whose best-scored choice is the label; exact match the share whose
    generation is the answer. The second pass takes two of the first pass's generations as answers, so
    exactly those two match (generation is deterministic)."""
    lm = Recording(tiny_model(), ByteTokenizer(), arm, mc_samples=4, max_gen_toks=8)
    accuracy, exact = evaluate(lm, write_tasks(tmp_path, DOCS))
    best = {doc: max(scores, key=scores.get) for doc, scores in lm.scores.items()}
    assert sorted(best) == [0, 1, 2] and all(len(lm.scores[doc]) == len(DOCS[doc]["choices"]) for doc in best)
    assert accuracy == pytest.approx(sum(best[i] == d["label"] for i, d in enumerate(DOCS)) / len(DOCS))
    assert exact == pytest.approx(sum(lm.generated[i] == d["answer"] for i, d in enumerate(DOCS)) / len(DOCS))

    first = dict(lm.generated)
    answered = [{**d, "answer": first[i] if i != 1 else d["answer"] + "?"} for i, d in enumerate(DOCS)]
    _, exact = evaluate(lm, write_tasks(tmp_path / "again", answered))
    assert lm.generated == first
    assert exact == pytest.approx(2 / 3)


@pytest.mark.parametrize("arm", ["autoregressive", "diffusion"])
def test_adapter_loglikelihood_matches_the_scorer(arm):
    model, tok = tiny_model(), ByteTokenizer()
    lm = DlmctlLM(model, tok, arm, mc_samples=4, greedy_check=False)
    requests = [Instance("loglikelihood", {}, ("Cats say ", "meow"), 0), Instance("loglikelihood", {}, ("", "hi"), 1)]
    scores = lm.loglikelihood(requests)
    # the context's trailing space moves into the continuation; an empty AR context becomes [eos]
    empty_context = [tok.eos_id] if arm == "autoregressive" else []
    expected = loglikelihood(model, arm, [(tok.encode("Cats say"), tok.encode(" meow")), (empty_context, tok.encode("hi"))],
                             mask_id=tok.mask_id, mc_samples=4)
    assert [s for s, _ in scores] == pytest.approx([s for s, _ in expected], abs=1e-5)


def test_rolling_loglikelihood_of_a_uniform_model_is_minus_n_ln_v():
    class Uniform(torch.nn.Module):
        shape = ModelShape(n_layer=1, d_model=8, n_head=1, n_kv_head=1, d_ff=8, vocab_size=258, max_seq_len=16)

        def __init__(self):
            super().__init__()
            self.anchor = torch.nn.Parameter(torch.zeros(1))

        def forward(self, idx, *, causal, **kwargs):
            return torch.zeros(*idx.shape, 258)

    text = "a string longer than one sixteen-token window"
    for arm in ("autoregressive", "diffusion"):
        [score] = DlmctlLM(Uniform(), ByteTokenizer(), arm, mc_samples=2).loglikelihood_rolling(
            [Instance("loglikelihood_rolling", {}, (text,), 0)])
        assert score == pytest.approx(-len(text) * math.log(258), abs=1e-3)


def test_generate_until_stops_at_the_stop_sequence():
    lm = DlmctlLM(tiny_model(), ByteTokenizer(), "autoregressive", max_gen_toks=12)
    [free] = lm.generate_until([Instance("generate_until", {}, ("abc", {"until": [], "max_gen_toks": 12}), 0)])
    assert len(free) >= 3, f"12 byte tokens decode to a few characters at least: {free!r}"
    stop = free[1:3]
    [cut] = lm.generate_until([Instance("generate_until", {}, ("abc", {"until": [stop], "max_gen_toks": 12}), 0)])
    assert stop not in cut and free.startswith(cut)


def test_lm_eval_loads_a_dlmctl_export_by_name(task_dir, tmp_path):
    """`--model dlmctl --model_args export=PATH` scores the folder `dlmctl export` writes."""
    from dlmctl.spec import experiment_from_dict
    from dlmctl.trainer.export import save_export
    from dlmctl.trainer.tokenizer import Tokenizer

    run = experiment_from_dict({"metadata": {"name": "x"}, "spec": {"arms": ["diffusion"]}}).runs()[0]
    tokenizer = Tokenizer.byte()
    model = tiny_model()
    save_export(model, tokenizer, run, tmp_path / "export")

    results = lm_eval.simple_evaluate(
        model="dlmctl", model_args=f"export={tmp_path / 'export'},mc_samples=4", tasks=["dlmctl_toy_choice"],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False), bootstrap_iters=0,
    )
    in_memory = Recording(model, tokenizer, "diffusion", mc_samples=4)
    in_memory.scores, in_memory.generated = {}, {}
    in_memory_results = lm_eval.simple_evaluate(
        model=in_memory, tasks=["dlmctl_toy_choice"],
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False), bootstrap_iters=0,
    )
    assert results["results"]["dlmctl_toy_choice"]["acc,none"] == \
        in_memory_results["results"]["dlmctl_toy_choice"]["acc,none"], "the export scores as the model it holds"
