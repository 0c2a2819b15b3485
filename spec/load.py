"""Reading a user's spec file safely, and turning every mistake into one line that names the field."""
from __future__ import annotations

import os
import re
import sysconfig
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import ValidationError

from .experiment import API_VERSION, KIND, Experiment, SweepPointError
from .redact import redact, redact_text

MAX_SPEC_BYTES = 1 << 20
MAX_DEPTH = 32
MAX_INTEGER_CHARS = 100  # a spec's largest integers have 16 digits; Python refuses to read more than 4300
MAX_SHOWN = 120  # characters of a value an error message shows


class SpecError(ValueError):
    """A user's mistake in a spec: the message is one line and names the field. `errors`: every mistake found,
    one `field: message` line each (the API service returns them all; the CLI prints the first)."""

    def __init__(self, message: str, errors: Optional[list[str]] = None):
        super().__init__(message)
        self.errors = errors or []


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
            if not isinstance(key_node, yaml.ScalarNode):
                kind = "list" if isinstance(key_node, yaml.SequenceNode) else "mapping"
                raise SpecError(f"line {key_node.start_mark.line + 1}: a key must be a plain name, not a {kind}")
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise SpecError(f"line {key_node.start_mark.line + 1}: duplicate key {_shown(key)}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node):
        if len(node.value) > MAX_INTEGER_CHARS:
            raise SpecError(f"line {node.start_mark.line + 1}: an integer of {len(node.value)} characters is too long "
                            f"(at most {MAX_INTEGER_CHARS})")
        return super().construct_yaml_int(node)

    def construct_object(self, node, deep=False):
        try:
            return super().construct_object(node, deep=deep)
        except (SpecError, yaml.YAMLError):
            raise
        except (ValueError, OverflowError, TypeError) as err:  # e.g. a timestamp that is no date: 2024-13-45
            raise SpecError(f"line {node.start_mark.line + 1}: cannot read {_shown(node.value)}: {err}") from None


_StrictLoader.add_constructor("tag:yaml.org,2002:int", _StrictLoader.construct_yaml_int)


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
    """A spec file: it must say what it is (apiVersion and kind), and must be a valid Experiment."""
    return experiment_from_dict(read_spec_file(path), str(path), require_header=True)


def experiment_from_dict(data: Any, source: str = "spec", require_header: bool = False) -> Experiment:
    """An Experiment from a parsed document, or a SpecError naming the field. `require_header`: a document a user
    wrote (a spec file) must carry apiVersion and kind; objects built in code may leave them out."""
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping with apiVersion, kind, metadata and spec")
    if require_header:
        for field, value in (("apiVersion", API_VERSION), ("kind", KIND)):
            if field not in data:
                raise SpecError(f"{source}: {field}: required field is missing (a spec file starts with "
                                f"apiVersion: {API_VERSION} and kind: {KIND})")
    try:
        return Experiment.model_validate(data)
    except ValidationError as err:
        raise SpecError(f"{source}: {redact_text(describe(err))}",
                        [redact_text(_describe_one(e)) for e in err.errors()]) from None
    except (ValueError, TypeError) as err:
        raise SpecError(f"{source}: {redact_text(str(err))}") from None


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
        point = _point(cause.point)
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


def _shown(value: Any, limit: int = MAX_SHOWN) -> str:
    """`repr(value)` as an error message may show it: secrets masked, cut to `limit` characters."""
    text = redact_text(repr(redact(value)))
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


# ---- what a local run needs on this machine ---------------------------------------------------------------

TEXT_SUFFIXES = (".txt", ".md", ".py", ".jsonl")  # the files trainer/corpus.py reads from a folder


def check_local_paths(experiment: Experiment) -> None:
    """What a run on *this* machine reads must be here: `spec.data.train`, `spec.data.validation` and
    `spec.data.tokenizer.path` when they are local paths (relative ones from the current directory), and
    the text must be large enough for the tokens asked of it. The local backend calls this before it writes
    anything; a cluster's pods see other disks, so `validate` and `render` do not. Raises SpecError naming
    the field."""
    checked: set[tuple] = set()
    for run in experiment.iter_runs():
        data = run.spec.data
        key = (data.train, data.validation, data.tokenizer.kind, data.tokenizer.path, data.unique_tokens,
               data.validation_tokens)
        if key in checked:
            continue
        checked.add(key)
        where = f" (sweep point {_point(run.point)})" if run.point else ""
        train = _local_text_bytes(data.train, "spec.data.train", where)
        validation = _local_text_bytes(data.validation, "spec.data.validation", where)
        if data.tokenizer.kind == "file" and _is_local(data.tokenizer.path):
            path = _local_path(data.tokenizer.path)
            if not (path / "tokenizer.json" if path.is_dir() else path).is_file():
                raise SpecError(f"spec.data.tokenizer.path: {_shown_path(data.tokenizer.path)} does not exist"
                                f"{' (a folder without tokenizer.json)' if path.is_dir() else ''}{where}")
        if data.tokenizer.kind != "file":  # byte-level: at most one token per byte, plus one per document
            _check_enough_text(data, train, validation, where)


LOCAL_PATH_FIELDS = ("data.train", "data.validation", "data.cache", "data.tokenizer.path", "checkpoint.uri")


def absolute_local_paths(experiment: Experiment, cwd: Optional[Path] = None) -> Experiment:
    """The experiment with each relative local path of LOCAL_PATH_FIELDS (in the spec and in its sweep) made
    absolute from `cwd` (default: the current directory), as check_local_paths reads them. The local backend
    stores this: its trainers run in their own folders, where a relative path would name something else."""
    base = Path.cwd() if cwd is None else cwd

    def absolute(value):
        if not isinstance(value, str) or not _is_local(value):
            return value
        scheme = "file://" if value.startswith("file://") else ""
        path = _local_path(value)
        return value if path.is_absolute() else scheme + str((base / path).resolve())

    tree = experiment.model_dump(mode="json")
    for dotted in LOCAL_PATH_FIELDS:
        *sections, leaf = dotted.split(".")
        node = tree["spec"]
        for part in sections:
            node = node[part]
        node[leaf] = absolute(node.get(leaf))
        if dotted in tree["spec"]["sweep"]:
            tree["spec"]["sweep"][dotted] = [absolute(v) for v in tree["spec"]["sweep"][dotted]]
    return Experiment.model_validate(tree)


def _check_enough_text(data, train: Optional[int], validation: Optional[int], where: str) -> None:
    if train is not None and data.unique_tokens > 2 * train:
        raise SpecError(f"spec.data.unique_tokens: {data.unique_tokens:,} tokens asked but {_shown_path(data.train)} "
                        f"has {train:,} bytes of text (at most {2 * train:,} tokens){where}")
    if data.validation is not None:
        if validation is not None and data.validation_tokens > 2 * validation:
            raise SpecError(
                f"spec.data.validation_tokens: {data.validation_tokens:,} tokens asked but "
                f"{_shown_path(data.validation)} has {validation:,} bytes of text (at most {2 * validation:,} tokens)"
                f"{where}")
    elif train is not None and data.unique_tokens + data.validation_tokens > 2 * train:
        raise SpecError(
            f"spec.data.validation_tokens: {data.validation_tokens:,} validation tokens are held out of "
            f"{_shown_path(data.train)} besides {data.unique_tokens:,} unique tokens, but it has {train:,} bytes of "
            f"text (at most {2 * train:,} tokens); lower one of them or set spec.data.validation{where}")


def _is_local(uri: Optional[str]) -> bool:
    return uri is not None and not uri.startswith(("s3://", "builtin:"))


def _local_path(uri: str) -> Path:
    return Path(uri.removeprefix("file://")).expanduser()


def _local_text_bytes(uri: Optional[str], field: str, where: str) -> Optional[int]:
    """Bytes of the text files a local source holds (an upper bound: what the trainer reads is a subset);
    None for a source that is not on this machine."""
    if uri == "builtin:python-stdlib":
        return _tree_bytes(Path(sysconfig.get_paths()["stdlib"]), (".py",))
    if not _is_local(uri):
        return None
    path = _local_path(uri)
    if not path.exists():
        raise SpecError(f"{field}: {_shown_path(uri)} does not exist{where}")
    if path.is_file():
        return path.stat().st_size
    return _tree_bytes(path, TEXT_SUFFIXES)


def _tree_bytes(root: Path, suffixes: tuple[str, ...]) -> int:
    total = 0
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            if not name.startswith(".") and name.lower().endswith(suffixes):
                try:
                    total += os.stat(os.path.join(folder, name)).st_size
                except OSError:
                    pass
    return total


def _shown_path(uri: str) -> str:
    return redact_text(uri) if len(uri) <= MAX_SHOWN else redact_text(uri)[: MAX_SHOWN - 3] + "..."


def _point(point: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_shown(v, 60)}" for k, v in point.items())  # keys are fields of the spec: short
