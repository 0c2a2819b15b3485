"""Reading a user's spec file safely, and turning every mistake into one line that names the field."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .experiment import Experiment, SweepPointError

MAX_SPEC_BYTES = 1 << 20
MAX_DEPTH = 32


class SpecError(ValueError):
    """A user's mistake in a spec: the message is one line and names the field."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader without anchors/aliases (no YAML bombs) and without silently duplicated keys."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise SpecError(f"line {event.start_mark.line + 1}: YAML aliases (*{event.anchor}) are not allowed in a spec")
        self._depth = getattr(self, "_depth", 0) + 1
        if self._depth > MAX_DEPTH:
            raise SpecError(f"line {self.peek_event().start_mark.line + 1}: the spec is nested too deeply")
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise SpecError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# YAML 1.1 reads `1e6` as a string; researchers write token budgets that way, so accept YAML 1.2 numbers.
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str, source: str = "spec") -> Any:
    if len(text.encode()) > MAX_SPEC_BYTES:
        raise SpecError(f"{source}: larger than {MAX_SPEC_BYTES // 1024} KiB; a spec is a small YAML file")
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except SpecError as err:
        raise SpecError(f"{source}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpecError(f"{source}: invalid YAML: {where}{problem}") from None


def read_spec_file(path: str | Path) -> Any:
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_SPEC_BYTES:
            raise SpecError(f"{path}: {size} bytes is larger than {MAX_SPEC_BYTES // 1024} KiB; a spec is a small YAML file")
        if not path.is_file():
            raise SpecError(f"{path}: not a file")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise SpecError(f"{path}: not UTF-8 text") from None
    except OSError as err:
        raise SpecError(f"{path}: {err.strerror}") from None
    return parse_yaml(text, str(path))


def load_experiment(path: str | Path) -> Experiment:
    return experiment_from_dict(read_spec_file(path), str(path))


def experiment_from_dict(data: Any, source: str = "spec") -> Experiment:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping with apiVersion, kind, metadata and spec")
    try:
        return Experiment.model_validate(data)
    except ValidationError as err:
        raise SpecError(f"{source}: {describe(err)}") from None
    except (ValueError, TypeError) as err:
        raise SpecError(f"{source}: {err}") from None


def describe(err: ValidationError) -> str:
    """The first error as `spec.data.epochs: must be > 0`, plus how many more there are."""
    errors = err.errors()
    first = _describe_one(errors[0])
    return first if len(errors) == 1 else f"{first} (and {len(errors) - 1} more)"


_FIELD_PREFIX = re.compile(r"^([A-Za-z_][\w.\[\]]*): (.*)$", re.S)

_MESSAGES = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "missing": "required field is missing",
    "extra_forbidden": "unknown field",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be a whole number",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "string_too_short": "must have at least {min_length} characters",
    "string_too_long": "must have at most {max_length} characters",
    "too_short": "must have at least {min_length} items",
    "too_long": "must have at most {max_length} items",
    "string_pattern_mismatch": "does not match the pattern {pattern}",
    "literal_error": "must be one of {expected}",
    "enum": "must be one of {expected}",
    "finite_number": "must be a finite number",
}


def _describe_one(e: dict) -> str:
    path = ".".join(str(p) for p in e["loc"])
    cause = (e.get("ctx") or {}).get("error")
    if isinstance(cause, SweepPointError):
        point = ", ".join(f"{k}={v!r}" for k, v in cause.point.items())
        inner = describe(cause.cause) if isinstance(cause.cause, ValidationError) else str(cause.cause)
        return f"spec.sweep ({point}): {_join('spec', inner)}"
    if e["type"] == "value_error":
        msg = str(cause) if cause is not None else e["msg"].removeprefix("Value error, ")
    elif e["type"] in _MESSAGES:
        try:
            msg = _MESSAGES[e["type"]].format(**{k: _plain(v) for k, v in (e.get("ctx") or {}).items()})
            msg = re.sub(r"\b1 (item|character)s\b", r"1 \1", msg)
        except KeyError:
            msg = e["msg"]
    else:
        msg = e["msg"]
    return _join(path, msg)


def _plain(value):
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _join(path: str, msg: str) -> str:
    """Validator messages may start with the field they are about (`epochs: ...`); fold it into the path."""
    msg = " ".join(msg.split())
    match = _FIELD_PREFIX.match(msg)
    if match and not match.group(1).startswith(("line ", "http")):
        field, rest = match.groups()
        if field.startswith(("spec.", "metadata.")) or not path:
            return f"{field}: {rest}"
        return f"{path}.{field}: {rest}"
    return f"{path}: {msg}" if path else msg
