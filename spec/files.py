"""Writing a file so that no reader ever sees it half-written: into a temporary file beside it, then renamed
over it in one step (the one way every dlmctl process writes a file others may be reading)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Optional


def write_atomically(path: str | os.PathLike, data: bytes | str, *, mode: Optional[int] = None,
                     durable: bool = False) -> None:
    """`data` (text is written as UTF-8) to `path`. `mode`: the file's permissions (set before anything is
    written); `durable`: flushed to the disk before the rename (for state that must survive a crash)."""
    path = Path(path)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
