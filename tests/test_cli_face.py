"""The CLI's face: what a pipe or a CI log sees, one meaning for --json, hub options, model cards."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def mqtool_piped(*args: str, **env: str) -> subprocess.CompletedProcess:
    """`mqtool ARGS` in a child process with stdout and stderr both pipes (as `| cat` or a CI log)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", **env}
    full_env.pop("TTY_COMPATIBLE", None)
    # bytes, decoded by hand: text mode would turn a carriage return into a newline
    r = subprocess.run([sys.executable, "-m", "mqtool", *args], capture_output=True, env=full_env, timeout=300)
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode())


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.mark.parametrize("force_color", ["", "1"])
def test_piped_progress_prints_no_blank_lines(force_color):
    """A progress bar in a pipe left blank lines (and with FORCE_COLOR=1, carriage-return redraws)."""
    env = {"FORCE_COLOR": force_color} if force_color else {}
    r = mqtool_piped("eval", "demo", "--tasks", "demo", "--seqlen", "64", "--max-windows", "2", "--device", "cpu",
                     **env)
    assert r.returncode == 0, r.stderr
    for stream in (r.stdout, r.stderr):
        assert "\r" not in stream
        lines = [ANSI.sub("", line) for line in stream.rstrip("\n").split("\n")] if stream else []
        assert "" not in lines, repr(stream)
    assert "demo" in r.stdout  # the table is there


def test_json_is_a_stdout_flag_in_compare(capsys, tmp_path):
    """compare --json prints the report (and only it) on stdout; --json-out writes the same to a file."""
    import json

    from helpers import run_cli

    js = tmp_path / "r.json"
    code, out, err = run_cli(capsys, "compare", "demo", "--recipes", "w8a8-rtn", "--tasks", "demo", "--seqlen", "64",
                             "--max-windows", "2", "--samples", "2", "--calib-seqlen", "32", "--calib-data", "demo",
                             "--device", "cpu", "--json", "--json-out", str(js))
    assert code == 0, err
    doc = json.loads(out)  # nothing but the JSON on stdout
    assert [r["recipe"] for r in doc["rows"]] == ["fp", "w8a8-rtn"]
    assert json.loads(js.read_text()) == doc


def test_old_json_path_usage_is_one_line(capsys, tmp_path):
    from helpers import run_cli

    code, out, err = run_cli(capsys, "compare", "demo", "--recipes", "w8a8-rtn", "--json", str(tmp_path / "x.json"))
    assert code == 2 and out == ""
    assert err.strip().count("\n") == 0 and "--json-out" in err, err
