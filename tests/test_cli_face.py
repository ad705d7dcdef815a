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


def test_model_card_in_every_checkpoint(capsys, tmp_path):
    """quantize-states (one stage) then quantize (a recipe): each output has a README.md naming the base
    model, the recipe, each stage with its parameters, and the perplexity its history recorded."""
    from helpers import run_cli

    one, two = tmp_path / "states", tmp_path / "recipe"
    assert run_cli(capsys, "quantize-states", "demo", "--bits", "8", "--method", "per-channel", "-o", str(one))[0] == 0
    code, _, err = run_cli(capsys, "quantize", "demo", "--recipe", "w8a8-rtn", "--device", "cpu", "-o", str(two))
    assert code == 0, err
    card = (one / "README.md").read_text()
    assert "Base model: `scripts/train_demo_model.py`" in card
    assert "**quantize-states**: `bits=8`, `method=per-channel`" in card and "Recipe: none" in card
    assert "| stage 1 (train) | eval_ppl_fp32 | 76.175 |" in card  # the demo model's recorded FP perplexity
    card = (two / "README.md").read_text()
    assert "Recipe: `w8a8-rtn`" in card and "**quantize**: `weights=" in card
    assert "tags: [mamba, mqtool, quantized]" in card


def test_model_card_measured_perplexity(tmp_path):
    from mqtool.checkpoint import Manifest, save_checkpoint
    from mqtool.models import MambaConfig

    cfg = MambaConfig(d_model=16, n_layer=1, vocab_size=16, ssm_cfg={"d_state": 4})
    from mqtool.checkpoint import build_model, model_state_dict

    save_checkpoint(tmp_path / "c", cfg, model_state_dict(build_model(cfg)), Manifest(source="state-spaces/mamba-130m"),
                    perplexity={"wikitext2": 21.5})
    card = (tmp_path / "c" / "README.md").read_text()
    assert "base_model: state-spaces/mamba-130m" in card and "| this checkpoint (wikitext2) | ppl | 21.500 |" in card
    assert "None: the weights are as they came." in card


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """huggingface_hub.snapshot_download replaced by one that records its arguments and hands back
    the embedded demo model's weights, config and tokenizer as a plain repo (no mqtool.json; no network)."""
    import shutil

    import huggingface_hub

    from mqtool.cli._common import DEMO_MODEL

    repo = tmp_path / "hub-snapshot"
    repo.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        shutil.copyfile(DEMO_MODEL / name, repo / name)
    calls: list[dict] = []

    def snapshot_download(repo_id, **kw):
        calls.append({"repo_id": repo_id, **kw})
        return str(repo)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return calls


def test_revision_and_token_reach_the_hub(capsys, tmp_path, fake_hub, monkeypatch):
    from helpers import run_cli

    code, out, err = run_cli(capsys, "--revision", "v1", "--token", "hf_x", "info", "someone/mamba-tiny")
    assert code == 0, err
    assert fake_hub[-1]["repo_id"] == "someone/mamba-tiny"
    assert fake_hub[-1]["revision"] == "v1" and fake_hub[-1]["token"] == "hf_x"
    # owner/name@revision, and the token from $HF_TOKEN; the card names the repo as the base model
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    code, _, err = run_cli(capsys, "quantize", "someone/mamba-tiny@abc123", "--weights", "8", "--device", "cpu",
                           "-o", str(tmp_path / "q"))
    assert code == 0, err
    assert fake_hub[-1]["revision"] == "abc123" and fake_hub[-1]["token"] == "hf_env"
    card = (tmp_path / "q" / "README.md").read_text()
    assert "base_model: someone/mamba-tiny\n" in card and "Base model: `someone/mamba-tiny@abc123`" in card
    # without either: huggingface-hub's defaults
    monkeypatch.delenv("HF_TOKEN")
    assert run_cli(capsys, "info", "someone/mamba-tiny")[0] == 0
    assert fake_hub[-1]["revision"] is None and fake_hub[-1]["token"] is None


def test_conflicting_revisions_are_one_line(capsys, fake_hub):
    from helpers import run_cli

    code, _, err = run_cli(capsys, "--revision", "v1", "info", "someone/mamba-tiny@v2")
    assert code == 2 and err.startswith("error: ") and err.strip().count("\n") == 0 and "give one" in err


def test_plot_writes_pngs(capsys, tmp_path):
    """mqtool plot on a quantized demo (calibrations of it and of a rotated copy, FP base): every
    figure is a PNG of a real size."""
    pytest.importorskip("matplotlib")
    from PIL import Image

    from helpers import run_cli

    cal, rot, rcal, q = tmp_path / "cal", tmp_path / "rot", tmp_path / "rcal", tmp_path / "q"
    small = ("--data", "demo", "--samples", "2", "--seqlen", "32", "--state-samples", "1", "--device", "cpu")
    assert run_cli(capsys, "quantize", "demo", "--weights", "4", "--device", "cpu", "-o", str(q))[0] == 0
    assert run_cli(capsys, "calibrate", str(q), *small, "-o", str(cal))[0] == 0
    assert run_cli(capsys, "rotate", "demo", "--method", "hadamard", "--device", "cpu", "-o", str(rot))[0] == 0
    assert run_cli(capsys, "calibrate", str(rot), *small, "-o", str(rcal))[0] == 0
    code, _, err = run_cli(capsys, "plot", str(q), "--calib", str(cal), "--after", str(rcal), "--base", "demo",
                           "--device", "cpu", "-o", str(tmp_path / "plots"))
    assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == ["input-absmax-in_proj.png", "input-absmax-out_proj.png", "state-map.png", "state-profiles.png",
                     "weight-error.png"]
    for name in names:
        with Image.open(tmp_path / "plots" / name) as im:
            assert im.format == "PNG" and im.size[0] >= 300 and im.size[1] >= 200, (name, im.size)
    assert "wrote 5 PNG files" in " ".join(err.split())
