"""Reading the SPEC argument: a file path, or `-` for standard input."""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dlmctl.spec import Experiment


def load(path: str) -> "Experiment":
    from dlmctl.spec import SpecError, experiment_from_dict, load_experiment, parse_yaml
    from dlmctl.spec.load import MAX_SPEC_BYTES

    if path != "-":
        return load_experiment(path)
    data = sys.stdin.buffer.read(MAX_SPEC_BYTES + 1)
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(f"<stdin>: larger than {MAX_SPEC_BYTES // 1024} KiB; a spec is a small YAML file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError("<stdin>: not UTF-8 text") from None
    return experiment_from_dict(parse_yaml(text, "<stdin>"), "<stdin>", require_header=True)
