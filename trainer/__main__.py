"""`python -m dlmctl.trainer --run run.json --output DIR [--fresh]` (or the run as JSON in $DLMCTL_RUN_SPEC).

Exit codes: 0 done; 143 stopped by SIGTERM after a checkpoint; 2 a user error (bad spec, bad credentials,
a missing bucket, no space, checkpoints that do not verify) with one `error: ...` line on stderr, which
the operator and the local backend do not retry; 1 anything else (a restart may help).

`python -m dlmctl.trainer prepare-data [--run FILE] [--worker I] [--workers N] [--plan-wait SECONDS]`
tokenizes the run's data into its token cache (spec.data.cache, else $DLMCTL_CACHE), as worker I of N of
a Kubernetes Indexed Job (I defaults to $JOB_COMPLETION_INDEX, N to $DLMCTL_DATA_WORKERS): worker 0
builds the plan, every worker the shards j = I (mod N), and the last to finish the completion manifest.
Exit codes: 0 done; 2 a user error (one `error: ...` line); 1 anything else (a retry may help).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch

from dlmctl.spec import Run, SpecError
from dlmctl.spec.contracts import RUN_SPEC_ENV
from dlmctl.spec.settings import DATA_WORKERS_ENV, FRESH_ENV, TrainerSettings, read

from .training_state import RunFailed
from .data import prepare_shards
from .loop import train


def parse_args(argv=None) -> tuple[Run, Path]:
    parser = argparse.ArgumentParser(prog="python -m dlmctl.trainer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="the resolved run (JSON); default: $DLMCTL_RUN_SPEC")
    parser.add_argument("--output", type=Path, default=None,
                        help="where metrics.jsonl and local checkpoints go; default: $DLMCTL_OUTPUT or ./runs/<run>")
    parser.add_argument("--fresh", action="store_true",
                        help=f"start over at step 0, ignoring existing checkpoints (as ${FRESH_ENV}=1 does); they "
                             "stay in the store until this start's first checkpoint is written")
    args = parser.parse_args(argv)
    settings = read(TrainerSettings)
    if args.fresh and settings.fresh_token is None:
        os.environ[FRESH_ENV] = "1"  # for this process's checkpoint store, and its children
    run = read_run(args.run, parser, settings)
    output = args.output or settings.output or Path(f"runs/{run.name}")
    return run, output


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value.isdigit() else default


def read_run(path: Path | None, parser: argparse.ArgumentParser, settings: TrainerSettings) -> Run:
    if path is not None:
        text = path.read_text()
    elif settings.run_spec:
        text = settings.run_spec
    else:
        parser.error(f"give --run FILE or set {RUN_SPEC_ENV}")
    try:
        return Run.model_validate_json(text)
    except ValueError as err:
        raise SpecError(f"run spec: {str(err).splitlines()[0]}") from None


def prepare_data_main(argv) -> int:
    parser = argparse.ArgumentParser(prog="python -m dlmctl.trainer prepare-data",
                                     description="Tokenize a run's data into its token cache, shard by shard.")
    parser.add_argument("--run", type=Path, help="the resolved run (JSON); default: $DLMCTL_RUN_SPEC")
    parser.add_argument("--worker", type=int, default=_env_int("JOB_COMPLETION_INDEX", 0),
                        help="this worker's index (default: $JOB_COMPLETION_INDEX or 0)")
    parser.add_argument("--workers", type=int, default=None,
                        help=f"how many workers share the shards (default: ${DATA_WORKERS_ENV} or 1)")
    parser.add_argument("--plan-wait", type=float, default=6 * 3600,
                        help="seconds a worker other than 0 waits for the plan (default: 6 h)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        settings = read(TrainerSettings)
        run = read_run(args.run, parser, settings)
        workers = settings.data_workers if args.workers is None else args.workers
        if workers < 1:
            raise SpecError(f"--workers: {workers} is not a positive number of workers")
        result = prepare_shards(run.spec.data, settings.cache, args.worker, workers, args.plan_wait)  # spec.data.cache wins
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        _termination_message(f"error: {err}")
        return 2
    print(json.dumps(result), flush=True)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["prepare-data"]:
        return prepare_data_main(argv[1:])
    try:
        run, output = parse_args(argv)
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    apply_thread_count()
    try:
        return train(run, output)
    except (RunFailed, SpecError) as err:  # SpecError: e.g. the data the spec names is not there; not retried
        sys.stderr.flush()
        print(f"error: {err}", file=sys.stderr, flush=True)
        _termination_message(f"error: {err}")
        return getattr(err, "exit_code", 2)


def apply_thread_count() -> int:
    """torch's CPU threads from OMP_NUM_THREADS (set by the local supervisor and in a pod from the CPUs per
    process), should torch not have taken it already; logged once per node. Returns the count in use."""
    wanted = os.environ.get("OMP_NUM_THREADS", "").strip()
    if wanted.isdigit() and int(wanted) >= 1 and torch.get_num_threads() != int(wanted):
        torch.set_num_threads(int(wanted))
    threads = torch.get_num_threads()
    if os.environ.get("LOCAL_RANK", "0") == "0":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
        logging.getLogger("dlmctl.trainer").info(
            "%d CPU threads per process (OMP_NUM_THREADS=%s, OMP_WAIT_POLICY=%s)", threads,
            wanted or "unset", os.environ.get("OMP_WAIT_POLICY", "unset"))
    return threads


def _termination_message(text: str, path: Path = Path("/dev/termination-log")) -> None:
    """In a Kubernetes container the reason also goes where the pod's status picks it up."""
    try:
        if path.exists():
            path.write_text(text + "\n")
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
