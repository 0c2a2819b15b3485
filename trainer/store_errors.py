"""What can go wrong with a checkpoint store, and what each error means: the exceptions the store raises,
and which errors are worth retrying (transient), which a person must fix (credentials, bucket, space),
and how to say so in one line."""
from __future__ import annotations

import errno
from pathlib import Path


class CheckpointError(Exception):
    """Base of the errors the checkpoint store raises."""


class CheckpointInvalid(CheckpointError):
    """A step folder that is not a usable checkpoint (no manifest, missing, truncated or altered file)."""


class CheckpointUploadError(CheckpointError):
    """An upload that failed for good: a permanent error, or transient ones past the retry budget."""


class RetryDeadlinePassed(CheckpointUploadError):
    """Transient errors for longer than the retry policy allows (the store is unreachable)."""

    def __init__(self, message: str, since: float, failing_for: float):
        super().__init__(message)
        self.since, self.failing_for = since, failing_for  # wall-clock time of the first failure, seconds since


class UploadAbandoned(CheckpointUploadError):
    """An upload stopped by close(): not a failure of the store."""


class StoreUnavailable(CheckpointError):
    """The store could not be read within the retry budget: resume must not silently start from scratch."""


class StoreFailure(CheckpointError):
    """The store cannot be used: a permanent error or an outage past the retry deadline. `exit_code` is 2
    for what a person must fix (credentials, bucket, permissions, space), 1 otherwise."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


class NoVerifiedCheckpoint(CheckpointError):
    """Checkpoints exist but none verifies: the run must not quietly start over at step 0."""

    def __init__(self, uri: str, problems: list[str]):
        self.problems = problems
        count = f"{len(problems)} checkpoint{'s' if len(problems) != 1 else ''}"
        super().__init__(f"{uri}: {count} and none verifies: {'; '.join(problems)}; repair or delete them, "
                         f"or start over from step 0 with --fresh (DLMCTL_FRESH=1)")


class StagingSpaceError(CheckpointError):
    """The staging disk cannot hold one checkpoint even with no upload pending."""

    def __init__(self, step: int, need: int, free: int, root: Path):
        self.step, self.need, self.free, self.root = step, need, free, root
        if need > free:
            size = f"needs about {human_size(need)} in the staging directory {root} and only {human_size(free)} is free there"
        else:  # the write ran out of space: the estimate was short
            size = (f"needs more than the {human_size(free)} free in the staging directory {root} (about {human_size(need)} "
                    f"estimated; writing it ran out of space)")
        super().__init__(f"checkpoint step {step} {size}; give it more room or set DLMCTL_STAGING to a larger volume")


_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_USER_ERRNOS = _SPACE_ERRNOS | {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT}
# OSErrors that the same request would meet again: no space, no permission, a read-only disk, a bad request
# (s3fs maps S3's 4xx codes onto these errnos; 5xx and throttling become EIO, EREMOTEIO and EBUSY).
_PERMANENT_ERRNOS = _USER_ERRNOS | {errno.EISDIR, errno.ENOTDIR, errno.EINVAL, errno.ENAMETOOLONG, errno.EMSGSIZE,
                                    errno.ENOSYS, errno.EREMCHG}


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def is_space_error(exc: BaseException) -> bool:
    """No space left (or quota exceeded), also as torch's stream writer reports it ("file write failed")."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in _SPACE_ERRNOS:
            return True
        if "No space left" in str(e) or "file write failed" in str(e):
            return True
    return False


def is_user_error(exc: BaseException) -> bool:
    """What a person must fix: credentials, a missing bucket, permissions, a full disk."""
    if isinstance(exc, (PermissionError, FileNotFoundError)) or is_space_error(exc):
        return True
    if isinstance(exc, OSError) and exc.errno in _USER_ERRNOS:
        return True
    try:
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError
        return isinstance(exc, (NoCredentialsError, PartialCredentialsError))
    except ImportError:
        return False


def reason(exc: BaseException, *, local: bool = False) -> str:
    """`describe(exc)` with what it most likely means for a checkpoint store (an S3 one unless `local`)."""
    if is_space_error(exc):
        return f"no space left ({describe(exc)})"
    if local:
        kind = {PermissionError: "permission denied", FileNotFoundError: "not found"}.get(type(exc))
        return f"{kind} ({describe(exc)})" if kind else describe(exc)
    if isinstance(exc, PermissionError) or type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        return (f"access denied ({describe(exc)}); check the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                f"or spec.checkpoint.credentials_secret on a cluster) and that they may write there")
    if isinstance(exc, FileNotFoundError):
        return f"not found ({describe(exc)}); does the bucket exist?"
    return describe(exc)


def is_transient(exc: BaseException) -> bool:
    """Connection refused/reset, timeouts, 5xx and throttling are worth retrying; bad credentials, a
    missing bucket, no space left or a bug are not."""
    permanent = (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError, FileExistsError,
                 ValueError, TypeError, AttributeError, KeyError, NotImplementedError)
    if isinstance(exc, permanent):
        return False
    if isinstance(exc, OSError) and exc.errno in _PERMANENT_ERRNOS:
        return False
    try:
        from botocore.exceptions import BotoCoreError, NoCredentialsError, ParamValidationError, PartialCredentialsError
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError, ParamValidationError)):
            return False
        if isinstance(exc, BotoCoreError):
            return True
    except ImportError:  # no S3 support installed: only local errors can happen
        pass
    try:
        import aiohttp
        if isinstance(exc, aiohttp.ClientError):
            return True
    except ImportError:
        pass
    return isinstance(exc, (OSError, TimeoutError, ConnectionError))


def describe(exc: BaseException) -> str:
    """One line about an error, for logs: type and (truncated) message. Messages from botocore and s3fs
    carry URLs and S3 error codes, never keys."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def human_size(n: float) -> str:
    if n < 1000:
        return f"{n:.0f} bytes"
    for unit in ("KB", "MB", "GB", "TB"):
        n /= 1000
        if n < 1000 or unit == "TB":
            return f"{n:.2f} {unit}" if n < 10 else f"{n:.1f} {unit}" if n < 100 else f"{n:.0f} {unit}"
    return f"{n:.0f} TB"


