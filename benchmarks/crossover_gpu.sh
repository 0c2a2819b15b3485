#!/usr/bin/env bash
# The crossover at GPU scale, in <= 8 minutes on one H100/H200: a ~60M-parameter model, DLM vs AR, on a unique
# budget small enough (256K tokens of WikiText-2) that AR overfits within the run (~120 epochs), bf16.
# Prints `dlmctl compare`'s table and writes the plot, the page and the JSON under OUT.
#
#   benchmarks/crossover_gpu.sh [OUT]        (default OUT: /tmp/crossover-gpu)
#   DATA=/path/to/shared/data  DLMCTL=.venv/bin/dlmctl  benchmarks/crossover_gpu.sh
#
# Needs dlmctl[train] with a CUDA torch; the corpora of ../shared/data (WikiText-2: test.txt trains,
# valid.txt validates). Budget: 2 runs x ~30M tokens; at ~300K tokens/s a run takes ~2-3 minutes
# plus its evaluations.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/crossover-gpu}
DATA=${DATA:-$(cd .. && pwd)/shared/data}
DLMCTL=${DLMCTL:-$( [ -x .venv/bin/dlmctl ] && echo .venv/bin/dlmctl || echo dlmctl )}
[ -f "$DATA/wikitext-2/test.txt" ] || { echo "crossover_gpu.sh: no $DATA/wikitext-2/test.txt; set DATA" >&2; exit 2; }
python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'crossover_gpu.sh: no CUDA device')"
mkdir -p "$OUT"
export DLMCTL_HOME="$OUT/home"   # this check's runs stay apart from the user's
cat > "$OUT/crossover-gpu.yaml" <<YAML
apiVersion: dlmctl.io/v1alpha1
kind: Experiment
metadata:
  name: crossover-gpu
spec:
  arms: [diffusion, autoregressive]
  seed: 1234
  model: {preset: null, n_layer: 8, d_model: 640, n_head: 10, d_ff: 1728, tie_embeddings: true}
  data:
    train: $DATA/wikitext-2/test.txt
    validation: $DATA/wikitext-2/valid.txt
    unique_tokens: 262144
    total_tokens: 31457280
    seq_len: 512
    validation_tokens: 131072
    packing: per-epoch
    tokenizer: {kind: bpe, vocab_size: 8192}
  objective:
    diffusion: {random_length_fraction: 0.01}
  precision: bf16
  optimizer: {lr: 1.0e-3, weight_decay: 0.1}
  schedule: {kind: wsd, warmup_fraction: 0.02, decay_fraction: 0.1}
  batch: {global_sequences: 64, micro_batch_sequences: 64}
  resources: {gpus_per_node: 1}
  eval:
    interval_steps: 40
    batches: 8
    elbo_samples: 4
    mc_samples: 8
    choice_task: {examples: 256, choices: 4}
  checkpoint: {interval_steps: 400, keep_last: 1}
  metrics: {port: 0, log_interval_steps: 20}
YAML
start=$(date +%s)
"$DLMCTL" submit "$OUT/crossover-gpu.yaml" --backend local --wait --replace
"$DLMCTL" compare crossover-gpu --backend local --plot "$OUT/crossover-gpu.png" --html "$OUT/crossover-gpu.html"
"$DLMCTL" compare crossover-gpu --backend local -o json > "$OUT/crossover-gpu.json"
"$DLMCTL" compare crossover-gpu --backend local --metric choice_acc
echo "crossover_gpu.sh: $(( $(date +%s) - start )) s; results in $OUT"
