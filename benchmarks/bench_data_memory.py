"""Peak memory of preparing and loading data, against the pool's size: it should stay flat.

For each pool size (1e6, 1e7, 1e8 tokens by default) a synthetic .jsonl corpus of about that many bytes is
written to a temporary directory, then a fresh child process runs `prepare_data` (byte tokenizer: one token
per byte, so the pool is `unique_tokens` tokens of the corpus) into an empty cache, builds the training
batches (pool fingerprint, per-epoch document offsets), reads a few batches and exits; a second child loads
the same entry from the cache. Reported per size: the child's peak RSS (ru_maxrss), its RSS once the
imports are done (the baseline: torch, tokenizers), the peak above that baseline, and CPU and wall time.
The ratios peak(largest)/peak(smallest) are printed last. JSON is written only with --out.

    .venv/bin/python benchmarks/bench_data_memory.py [--sizes 1e6 1e7 1e8] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, os, resource, sys, threading, time
from pathlib import Path
import numpy as np
from dlmctl.spec.sections import DataSpec
from dlmctl.trainer.data import prepare_data

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

anon_peak, done = [status("RssAnon")], threading.Event()

def sample():  # RssAnon: memory not backed by a file (memory-mapped pool pages are RssFile)
    while not done.wait(0.005):
        anon_peak[0] = max(anon_peak[0], status("RssAnon"))

threading.Thread(target=sample, daemon=True).start()
baseline, anon_baseline = status("VmRSS"), status("RssAnon")
started, cpu = time.perf_counter(), time.process_time()
corpus, cache, tokens, packing = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
spec = DataSpec(train=corpus, unique_tokens=tokens, validation_tokens=20_000, seq_len=1024, tokenizer={"kind": "byte"},
                packing=packing)
data = prepare_data(spec, 0, Path(cache))
batches = data.train_batches()
fingerprint = batches.fingerprint
for step in range(4):
    batches.batch(step, 0, 0, 1, 8, 8)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
done.set()
print(json.dumps({"baseline": baseline, "peak": peak, "anon_baseline": anon_baseline, "anon_peak": anon_peak[0], "wall": time.perf_counter() - started,
                  "cpu": time.process_time() - cpu, "hit": data.metadata["cache_hit"], "shards": data.metadata["shards"]}))
"""


def write_corpus(folder: Path, total_bytes: int, seed: int = 0, file_bytes: int = 16 << 20) -> None:
    """.jsonl files of ~2 KB documents of random words, `total_bytes` of text in all."""
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocabulary = np.array(["".join(rng.choice(letters, size=rng.integers(2, 10))) for _ in range(5000)])
    folder.mkdir(parents=True)
    written, index = 0, 0
    while written < total_bytes:
        lines, size = [], 0
        while size < file_bytes and written + size < total_bytes:
            text = " ".join(vocabulary[rng.integers(0, len(vocabulary), size=int(rng.integers(100, 500)))])
            lines.append(json.dumps({"text": text}))
            size += len(text)
        (folder / f"part-{index:04d}.jsonl").write_text("\n".join(lines) + "\n")
        written, index = written + size, index + 1


def child(corpus: Path, cache: Path, tokens: int, packing: str) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, str(corpus), str(cache), str(tokens), packing],
                            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 1e8])
    parser.add_argument("--packing", default="per-epoch", choices=["fixed", "per-epoch"])
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        for size in map(int, args.sizes):
            corpus = Path(tmp) / f"corpus-{size}"
            write_corpus(corpus, int(size * 1.02) + 100_000)  # the pool, validation and a margin
            cache = Path(tmp) / f"cache-{size}"
            built = child(corpus, cache, size, args.packing)
            loaded = child(corpus, cache, size, args.packing)
            rows.append({"tokens": size, "build": built, "load": loaded})
            mib = 1 << 20
            for phase, r in (("build", built), ("load", loaded)):
                print(f"{size:>12,} tokens {phase:5}: peak RSS {r['peak'] / mib:7.1f} MiB (after imports {r['baseline'] / mib:6.1f}), "
                      f"peak anonymous {r['anon_peak'] / mib:7.1f} MiB (after imports {r['anon_baseline'] / mib:6.1f}); "
                      f"{r['cpu']:6.1f} s CPU {r['wall']:6.1f} s wall [{r['shards']} shards]", flush=True)
            for path in sorted(corpus.iterdir()):
                path.unlink()
    first, last = rows[0], rows[-1]
    ratios = {phase: last[phase]["peak"] / first[phase]["peak"] for phase in ("build", "load")}
    anon = {phase: last[phase]["anon_peak"] / first[phase]["anon_peak"] for phase in ("build", "load")}
    print(f"the pool grew {last['tokens'] / first['tokens']:.0f}x; peak({last['tokens']:.0e}) / peak({first['tokens']:.0e}): "
          f"RSS build {ratios['build']:.3f}, load {ratios['load']:.3f} (RSS counts the memory-mapped pool's pages read); "
          f"anonymous build {anon['build']:.3f}, load {anon['load']:.3f}")
    if args.out:
        args.out.write_text(json.dumps({"packing": args.packing, "rows": rows, "peak_ratio": ratios, "anon_peak_ratio": anon}, indent=1))


if __name__ == "__main__":
    main()
