"""`python -m dlmctl.trainer --run run.json --output DIR` (or the run as JSON in $DLMCTL_RUN_SPEC)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from dlmctl.spec import Run, SpecError


def parse_args(argv=None) -> tuple[Run, Path]:
    parser = argparse.ArgumentParser(prog="python -m dlmctl.trainer", description=__doc__)
    parser.add_argument("--run", type=Path, help="the resolved run (JSON); default: $DLMCTL_RUN_SPEC")
    parser.add_argument("--output", type=Path, default=None,
                        help="where metrics.jsonl and local checkpoints go; default: $DLMCTL_OUTPUT or ./runs/<run>")
    args = parser.parse_args(argv)
    if args.run is not None:
        text = args.run.read_text()
    elif os.environ.get("DLMCTL_RUN_SPEC"):
        text = os.environ["DLMCTL_RUN_SPEC"]
    else:
        parser.error("give --run FILE or set DLMCTL_RUN_SPEC")
    try:
        run = Run.model_validate_json(text)
    except ValueError as err:
        raise SpecError(f"run spec: {str(err).splitlines()[0]}") from None
    output = args.output or Path(os.environ.get("DLMCTL_OUTPUT", f"runs/{run.name}"))
    return run, output


def main(argv=None) -> int:
    try:
        run, output = parse_args(argv)
    except SpecError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from .loop import train

    return train(run, output)


if __name__ == "__main__":
    sys.exit(main())
