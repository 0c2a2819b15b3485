"""Running the `dlmctl` command inside a test, and what a user error must look like."""
from __future__ import annotations

from dlmctl.cli.app import main


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code, err, *fragments):
    """Exit 2, one line on stderr starting `error: `, no traceback, naming what it should."""
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, f"one line on stderr, got: {err!r}"
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
