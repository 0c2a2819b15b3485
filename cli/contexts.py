"""Named contexts: where commands go (local, a kubeconfig context, an API service), kept in one config file.

    $DLMCTL_CONFIG, else $DLMCTL_HOME/config.yaml (~/.dlmctl/config.yaml):

        current-context: team-a
        contexts:
          team-a: {backend: service, server: https://dlmctl.example.org, namespace: team-a, token: ...}
          laptop: {backend: local}

The file may hold tokens, so it is read only when nobody but its owner can read or write it (mode 0600 or
narrower) and it is always written whole, atomically, with mode 0600. Tokens are never printed.
"""
from __future__ import annotations

import os
import stat
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional

from .errors import UserError, one_line

CONFIG_ENV = "DLMCTL_CONFIG"
TOKEN_ENV = "DLMCTL_TOKEN"
BACKEND_NAMES = ("local", "kubernetes", "service")


@dataclass(frozen=True)
class Context:
    """One named target. `kube_context` picks the kubeconfig context of a kubernetes context; `server`,
    `ca_file` and `token` belong to a service context; `namespace` to both."""
    backend: str
    server: Optional[str] = None
    namespace: Optional[str] = None
    kube_context: Optional[str] = None
    ca_file: Optional[str] = None
    token: Optional[str] = field(default=None, repr=False)

    def to_yaml(self) -> dict:
        return {k.replace("_", "-"): v for k, v in asdict(self).items() if v is not None}


@dataclass
class Config:
    current: Optional[str] = None
    contexts: dict[str, Context] = field(default_factory=dict)

    def context(self, name: str) -> Context:
        if name not in self.contexts:
            known = ", ".join(sorted(self.contexts)) or "none; create one with `dlmctl config set-context`"
            raise UserError(f"no context named {name!r} in {config_path()} (its contexts: {known})")
        return self.contexts[name]

    def current_context(self) -> Optional[tuple[str, Context]]:
        """The current context, if one is set (a current context that was deleted is an error)."""
        if self.current is None:
            return None
        return self.current, self.context(self.current)


def config_path() -> Path:
    from dlmctl.spec.settings import ClientSettings, read

    return read(ClientSettings).config_file


def load() -> Config:
    """The config file, or an empty one if there is none. Refused if group or others may read or write it."""
    import yaml

    path = config_path()
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return Config()
    except OSError as err:
        raise UserError(f"{path}: cannot read the dlmctl config ({err.strerror})") from None
    with os.fdopen(fd, encoding="utf-8") as f:
        mode = stat.S_IMODE(os.fstat(f.fileno()).st_mode)
        if mode & 0o077:
            raise UserError(f"{path}: mode {mode:04o} lets others read or change it and it may hold tokens; "
                            f"refusing to use it (chmod 600 {path})")
        text = f.read()
    try:
        doc = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {one_line(err)}") from None
    if not isinstance(doc, dict):
        raise UserError(f"{path}: expected a mapping with current-context and contexts")
    known = {f.name.replace("_", "-") for f in fields(Context)}
    contexts = {}
    for name, entry in (doc.get("contexts") or {}).items():
        if not isinstance(entry, dict) or entry.get("backend") not in BACKEND_NAMES:
            raise UserError(f"{path}: contexts.{name}.backend: must be one of {', '.join(BACKEND_NAMES)}")
        unknown = sorted(set(entry) - known)
        if unknown:
            raise UserError(f"{path}: contexts.{name}.{unknown[0]}: unknown field (known: {', '.join(sorted(known))})")
        settings = {k.replace("-", "_"): (None if v is None else str(v)) for k, v in entry.items()}
        contexts[str(name)] = Context(**settings)
    current = doc.get("current-context")
    return Config(current=str(current) if current is not None else None, contexts=contexts)


def save(config: Config) -> Path:
    """Write the whole file atomically (a temporary file in the same folder, then rename) with mode 0600."""
    import yaml

    path = config_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    doc = {"current-context": config.current,
           "contexts": {name: c.to_yaml() for name, c in sorted(config.contexts.items())}}
    from dlmctl.spec.files import write_atomically

    try:
        write_atomically(path, yaml.safe_dump(doc, sort_keys=False), mode=0o600, durable=True)
    except OSError as err:
        raise UserError(f"{path}: cannot write the dlmctl config ({err.strerror or err})") from None
    return path

