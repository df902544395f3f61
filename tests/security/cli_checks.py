"""What every bad-input CLI case asserts: one line, exit 2, naming the problem."""
from __future__ import annotations

from jaxrt.cli.main import main


def run_cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_exit_2(code, err, *needles):
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
