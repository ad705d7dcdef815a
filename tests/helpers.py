"""Helpers shared by test modules (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import sys

from mqtool.cli import main


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Runs `mqtool ARGS` in-process; returns (exit code, stdout, stderr)."""
    old = sys.argv
    sys.argv = ["mqtool", *args]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code or 0
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    return code, captured.out, captured.err
