"""Inputs the tool must refuse (or handle) cleanly: every case runs the CLI in-process and expects a
non-zero exit with a one-line `error:` message naming the problem, never a traceback (mqtool issue 16)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_cli
from mqtool.checkpoint import load_model

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one thread, restored after

CALIB = ("--calib-data", "demo", "--samples", "4", "--seqlen", "64")


def one_line_error(code: int, err: str, *needles: str) -> str:
    """Asserts a refusal: exit 2 and a single `error:` line (no traceback) containing every needle."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------ 5: bf16/fp16 quantized weights export


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("recipe", ["w8a8-rtn", "w4a8-gptq"])
def test_low_precision_quantize_exports(capsys, tmp_path: Path, dtype: str, recipe: str):
    q, x = tmp_path / "q", tmp_path / "x"
    code, _, err = run_cli(capsys, "quantize", "demo", "--recipe", recipe, "--dtype", dtype, *CALIB, "-o", str(q))
    assert code == 0, err
    code, _, err = run_cli(capsys, "export", str(q), "-o", str(x))
    assert code == 0, err
    stored = load_file(q / "model.safetensors")
    w = stored["backbone.layers.0.mixer.in_proj.weight"]
    assert w.dtype == torch.float32  # the exact q * scale, not its rounding to the compute dtype
    # the exported model computes what the simulated one does, in the same dtype
    dt = getattr(torch, dtype)
    sim, _ = load_model(q, dtype=dt)
    exp, _ = load_model(x, dtype=dt)
    for (name, a), (_, b) in zip(sim.state_dict().items(), exp.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_quantized_low_precision_state_dict_is_exact(dtype):
    """Unit: apply_quantize on a bf16/fp16 model; model_state_dict gives float32 weights on the grid
    (weight_codes accepts them), which the compute dtype rounds to the model's weight; a weight changed
    afterwards is stored as it is (its kept codes no longer apply)."""
    from mqtool.checkpoint import model_state_dict
    from mqtool.quant.weights import apply_quantize, exact_weight, weight_codes

    model, _ = load_model(DEMO, dtype=dtype)
    rec = apply_quantize(model, {}, None, weights={"bits": 4, "group_size": 32})
    state = model_state_dict(model)
    for name, spec in rec["tensors"].items():
        assert state[name].dtype == torch.float32
        weight_codes(state[name], spec)  # raises when off the grid
        assert torch.equal(state[name].to(dtype), model.get_parameter(name).detach())
    lin = model.get_submodule("backbone.layers.0.mixer.in_proj")
    with torch.no_grad():
        lin.weight[0, 0] += 1
    assert exact_weight(lin) is None
    assert model_state_dict(model)["backbone.layers.0.mixer.in_proj.weight"].dtype == dtype


def test_low_precision_chain_keeps_codes(capsys, tmp_path: Path):
    """A later stage run in bf16 (here quantize-states) stores the quantized weights exactly, too."""
    q, s, x = tmp_path / "q", tmp_path / "s", tmp_path / "x"
    assert run_cli(capsys, "quantize", "demo", "--recipe", "w8a8-rtn", "--dtype", "bfloat16", "-o", str(q))[0] == 0
    assert run_cli(capsys, "quantize-states", str(q), "--dtype", "bfloat16", "-o", str(s))[0] == 0
    code, _, err = run_cli(capsys, "export", str(s), "-o", str(x))
    assert code == 0, err


def test_export_of_a_low_precision_weight_says_why(capsys, tmp_path: Path):
    """A checkpoint written before the fix (quantized weights stored in bf16) is refused without
    blaming the user."""
    from mqtool.checkpoint import load_checkpoint, save_checkpoint

    q, old, x = tmp_path / "q", tmp_path / "old", tmp_path / "x"
    assert run_cli(capsys, "quantize", "demo", "--recipe", "w8a8-rtn", "-o", str(q))[0] == 0
    ck = load_checkpoint(q)
    state = {k: v.bfloat16() for k, v in ck.state_dict.items()}
    save_checkpoint(old, ck.config, state, ck.manifest, ck.tokenizer_path)
    line = one_line_error(*run_cli(capsys, "export", str(old), "-o", str(x))[::2], "bfloat16", "quantize")
    assert "changed after" not in line


# ------------------------------------------------------------------ 6: NaN / Inf weights and statistics


DEMO = Path(__file__).parent.parent / "src" / "mqtool" / "assets" / "demo-mamba2"
BAD_TENSOR = "backbone.layers.1.mixer.out_proj.weight"


def _demo_with(tmp_path: Path, name: str, edit) -> Path:
    """A copy of the demo checkpoint with `edit(state)` applied to its tensors."""
    from mqtool.checkpoint import load_checkpoint, save_checkpoint

    ck = load_checkpoint(DEMO)
    state = dict(ck.state_dict)
    edit(state)
    return save_checkpoint(tmp_path / name, ck.config, state, ck.manifest, ck.tokenizer_path)


def _poison(value: float):
    def edit(state):
        w = state[BAD_TENSOR].clone()
        w[3, 5] = value
        state[BAD_TENSOR] = w
    return edit


@pytest.mark.parametrize("value, kind", [(float("nan"), "NaN"), (float("inf"), "Inf")])
@pytest.mark.parametrize("command", [["eval", "--tasks", "demo"], ["quantize", "--weights", "8", "-o", "OUT"],
                                     ["calibrate", "--data", "demo", "--samples", "2", "--seqlen", "32",
                                      "-o", "OUT"]])
def test_non_finite_weight_refused(capsys, tmp_path: Path, value: float, kind: str, command: list[str]):
    bad = _demo_with(tmp_path, "bad", _poison(value))
    args = [str(tmp_path / "out") if a == "OUT" else a for a in command]
    one_line_error(*run_cli(capsys, args[0], str(bad), *args[1:])[::2], BAD_TENSOR, kind)
    assert not (tmp_path / "out").exists()  # nothing written


def test_non_finite_calibration_refused(capsys, tmp_path: Path):
    from mqtool.calibrate import Calibration

    calib = tmp_path / "calib"
    assert run_cli(capsys, "calibrate", "demo", "--data", "demo", "--samples", "2", "--seqlen", "32",
                   "-o", str(calib))[0] == 0
    c = Calibration.load(calib)
    name = "backbone.layers.0.mixer.in_proj.absmax"
    c.stats[name][0] = float("nan")
    c.save(calib)
    one_line_error(*run_cli(capsys, "quantize", "demo", "--weights", "8", "--weight-method", "gptq",
                            "--calib", str(calib), "-o", str(tmp_path / "q"))[::2], name)


def test_calibration_that_overflows_is_refused():
    """Statistics are checked as they are made (an fp16 overflow would otherwise become scales)."""
    from mqtool.calibrate import calibrate
    from mqtool.errors import MqtoolError

    model, _ = load_model(DEMO)
    with torch.no_grad():
        model.get_parameter(BAD_TENSOR)[3, 5] = float("inf")
    windows = torch.randint(0, 100, (2, 16))
    with pytest.raises(MqtoolError, match="calibration statistic .* is not finite"):
        calibrate(model, windows, {}, state_samples=0)


# ------------------------------------------------------------------ 7: a transformed checkpoint without its manifest


@pytest.mark.parametrize("stage, transform", [(["rotate", "demo", "--method", "hadamard"], "hadamard"),
                                              (["quantize", "demo", "--weights", "8", "--acts", "8"], "act_quant")])
def test_transformed_checkpoint_without_manifest_refused(capsys, tmp_path: Path, stage: list[str], transform: str):
    out = tmp_path / "out"
    assert run_cli(capsys, *stage, "-o", str(out))[0] == 0
    assert run_cli(capsys, "eval", str(out), "--tasks", "demo")[0] == 0  # with its manifest it loads
    (out / "mqtool.json").unlink()
    one_line_error(*run_cli(capsys, "eval", str(out), "--tasks", "demo")[::2], "mqtool.online_transforms",
                   transform, "mqtool.json")


def test_exported_checkpoint_without_manifest_refused(capsys, tmp_path: Path):
    q, x = tmp_path / "q", tmp_path / "x"
    assert run_cli(capsys, "rotate", "demo", "--method", "hadamard", "-o", str(tmp_path / "r"))[0] == 0
    assert run_cli(capsys, "quantize", str(tmp_path / "r"), "--weights", "4", "-o", str(q))[0] == 0
    assert run_cli(capsys, "export", str(q), "-o", str(x))[0] == 0
    (x / "mqtool.json").unlink()
    one_line_error(*run_cli(capsys, "eval", str(x), "--tasks", "demo")[::2], "hadamard", "mqtool.json")


def test_manifest_that_disagrees_with_the_tensors_refused(capsys, tmp_path: Path):
    """A rotated checkpoint's manifest replaced by a plain one (no online transforms)."""
    import json

    out = tmp_path / "r"
    assert run_cli(capsys, "rotate", "demo", "--method", "hadamard", "-o", str(out))[0] == 0
    m = json.loads((out / "mqtool.json").read_text())
    m["online"] = {}
    (out / "mqtool.json").write_text(json.dumps(m))
    one_line_error(*run_cli(capsys, "eval", str(out), "--tasks", "demo")[::2], "hadamard",
                   "no online transforms")


def test_attached_tensor_without_manifest_refused(capsys, tmp_path: Path):
    """Tensors a plain model lacks (an activation quantizer's static scale), without mqtool.json."""
    name = "backbone.layers.0.mixer.out_proj.input_quantizer.scale"
    bad = _demo_with(tmp_path, "bad", lambda s: s.update({name: torch.tensor(0.5)}))
    (bad / "mqtool.json").unlink()
    one_line_error(*run_cli(capsys, "eval", str(bad), "--tasks", "demo")[::2], name, "mqtool.json")


def test_plain_checkpoint_without_manifest_still_loads(capsys, tmp_path: Path):
    plain = _demo_with(tmp_path, "plain", lambda s: None)
    (plain / "mqtool.json").unlink()
    code, _, err = run_cli(capsys, "eval", str(plain), "--tasks", "demo")
    assert code == 0, err


# ------------------------------------------------------------------ 11/12: manifests


@pytest.fixture
def rotated(capsys, tmp_path: Path) -> Path:
    out = tmp_path / "rot"
    assert run_cli(capsys, "rotate", "demo", "--method", "hadamard", "-o", str(out))[0] == 0
    return out


def _edit_manifest(ckpt: Path, edit) -> None:
    import json

    m = json.loads((ckpt / "mqtool.json").read_text())
    edit(m)
    (ckpt / "mqtool.json").write_text(json.dumps(m))


def _set(key, value):
    return lambda m: m.__setitem__(key, value)


@pytest.mark.parametrize("edit, needle", [
    (_set("format_version", "1"), "format_version"),                       # 11: a version given as a string
    (_set("format_version", 0), "format_version"),                         # 12: version 0
    (lambda m: m["stages"][0].pop("stage"), "no 'stage' name"),             # 11: a stage entry without its name
    (lambda m: m["stages"][0].update(stage="rotat"), "'rotat'"),            # 12: an unknown stage
    (_set("stages", "rotate"), "'stages' must be a list"),
    (_set("online", ["hadamard"]), "'online' must be a mapping"),          # 11: online of the wrong type
    (lambda m: m["online"].update(hadamard="yes"), "'hadamard' must be a mapping"),
    (lambda m: m["online"]["hadamard"].pop("targets"), "malformed online transforms"),
    (lambda m: m["online"]["hadamard"].update(targets="out_proj"), "online transforms: unknown linear targets"),
    (_set("exported", "no"), "'exported' must be true or false"),
    (lambda m: m.clear() or m.update(format="mqtool", online=7), "'online' must be a mapping"),
])
def test_malformed_manifest_refused(capsys, rotated: Path, edit, needle: str):
    _edit_manifest(rotated, edit)
    one_line_error(*run_cli(capsys, "eval", str(rotated), "--tasks", "demo")[::2], "mqtool.json", needle)


def test_manifest_json_not_a_mapping_refused(capsys, rotated: Path):
    (rotated / "mqtool.json").write_text("[1, 2]")
    one_line_error(*run_cli(capsys, "eval", str(rotated), "--tasks", "demo")[::2], "not an mqtool manifest")


def test_known_stages_match_the_registry():
    """The manifest's list of stage names is the pipeline's registry plus export and the demo's train."""
    from mqtool.checkpoint import KNOWN_STAGES
    from mqtool.pipeline import STAGES

    assert set(KNOWN_STAGES) == set(STAGES) | {"export", "train"}


# ------------------------------------------------------------------ 12: silently accepted


def test_parallel_mode_on_quantized_states_refused(capsys, tmp_path: Path):
    st = tmp_path / "st"
    assert run_cli(capsys, "quantize-states", "demo", "-o", str(st))[0] == 0
    one_line_error(*run_cli(capsys, "eval", str(st), "--tasks", "demo", "--mode", "parallel")[::2],
                   "--mode recurrent")
    code, _, err = run_cli(capsys, "eval", str(st), "--tasks", "demo", "--max-windows", "1")
    assert code == 0, err  # auto: recurrent


def test_json_has_no_nan(capsys, tmp_path: Path):
    """Finite weights that overflow in float16: the ppl is not a number, and --json prints null."""
    import json

    huge = _demo_with(tmp_path, "huge", lambda s: s.update({"backbone.embedding.weight":
                                                             s["backbone.embedding.weight"] * 1e5}))
    code, out, err = run_cli(capsys, "eval", str(huge), "--tasks", "demo", "--dtype", "float16", "--json",
                             "--max-windows", "1")
    assert code == 0, err
    assert "NaN" not in out and "Infinity" not in out
    res = json.loads(out)["results"]["demo"]
    assert res["ppl"] is None
    assert "not finite" in err or "perplexity is" in err


def test_absurd_n_layer_refused_before_building(capsys, tmp_path: Path):
    import json
    import time

    big = _demo_with(tmp_path, "big", lambda s: None)
    cfg = json.loads((big / "config.json").read_text())
    cfg["n_layer"] = 10_000_000
    (big / "config.json").write_text(json.dumps(cfg))
    start = time.perf_counter()
    one_line_error(*run_cli(capsys, "eval", str(big), "--tasks", "demo")[::2], "n_layer=10000000",
                   "hold 4 of those layers")
    assert time.perf_counter() - start < 30


# ------------------------------------------------------------------ 11: one line where a traceback was


def test_recipe_samples_not_a_number(capsys, tmp_path: Path):
    recipe = tmp_path / "two.yaml"
    recipe.write_text("name: two\ncalibration: {data: demo, samples: \"two\", seqlen: 32}\n"
                      "stages:\n  - quantize: {weights: {bits: 8, method: gptq}}\n")
    one_line_error(*run_cli(capsys, "quantize", "demo", "--recipe", str(recipe), "-o", str(tmp_path / "q"))[::2],
                   "samples", "'two'")


def test_recipe_yaml_error_is_one_line(capsys, tmp_path: Path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("name: x\nstages:\n  - quantize: {weights: {bits: 8\n")
    one_line_error(*run_cli(capsys, "quantize", "demo", "--recipe", str(recipe), "-o", str(tmp_path / "q"))[::2],
                   "cannot parse recipe")


def test_pickle_with_objects_is_one_line(capsys, tmp_path: Path):
    import shutil

    ck = tmp_path / "pk"
    shutil.copytree(DEMO, ck)
    (ck / "model.safetensors").unlink()
    torch.save({"x": Path("p")}, ck / "pytorch_model.bin")  # a global that weights_only refuses
    line = one_line_error(*run_cli(capsys, "eval", str(ck), "--tasks", "demo")[::2], "pytorch_model.bin",
                          "more than tensors")
    assert "weights_only` set to `False`" not in line  # torch's advice to unpickle it unsafely is not repeated


def test_fallback_tokenizer_larger_than_vocabulary(capsys, tmp_path: Path, monkeypatch):
    import shutil

    monkeypatch.setenv("MQTOOL_DATA", "/work/shared/data")
    ck = tmp_path / "notok"
    shutil.copytree(DEMO, ck)
    (ck / "tokenizer.json").unlink()
    from mqtool.data import NEOX_LOCAL, data_root

    root = data_root(None)
    if root is None or not (root / NEOX_LOCAL).is_file():
        pytest.skip("needs the GPT-NeoX tokenizer under $MQTOOL_DATA")
    one_line_error(*run_cli(capsys, "eval", str(ck), "--tasks", "demo")[::2], "no tokenizer.json", "2048")


@pytest.mark.parametrize("device", ["tpu", "cuda:x", "meta"])
def test_bad_device(capsys, device: str):
    one_line_error(*run_cli(capsys, "eval", "demo", "--tasks", "demo", "--device", device)[::2], "--device")


def test_output_below_a_file(capsys, tmp_path: Path):
    f = tmp_path / "afile"
    f.write_text("x")
    for args in (["quantize", "demo", "--weights", "8", "-o", str(f / "q")],
                 ["calibrate", "demo", "--data", "demo", "--samples", "2", "--seqlen", "32", "-o", str(f / "c")],
                 ["compare", "demo", "--recipes", "w8a8-rtn", "--tasks", "demo", "--markdown", str(f / "x.md")],
                 ["compare", "demo", "--recipes", "w8a8-rtn", "--tasks", "demo", "--json-out", str(f / "x.json")]):
        one_line_error(*run_cli(capsys, *args)[::2], "is a file")


def test_reconstruct_state_dir_below_a_file(capsys, tmp_path: Path):
    f = tmp_path / "afile"
    f.write_text("x")
    st = tmp_path / "st"
    assert run_cli(capsys, "quantize-states", "demo", "-o", str(st))[0] == 0
    one_line_error(*run_cli(capsys, "reconstruct", str(st), "--calib-data", "demo", "--samples", "2", "--seqlen",
                            "32", "--state-dir", str(f / "s"), "-o", str(tmp_path / "r"))[::2], "is a file")


def test_compare_markdown_into_a_missing_directory(capsys, tmp_path: Path):
    md = tmp_path / "new" / "dir" / "table.md"
    code, _, err = run_cli(capsys, "compare", "demo", "--recipes", "w8a8-rtn", "--tasks", "demo", "--seqlen", "128",
                           "--max-windows", "1", "--markdown", str(md))
    assert code == 0, err
    assert md.read_text().startswith("| recipe |")


@pytest.mark.parametrize("damage", ["block", "json"])
def test_truncated_esr_state_file(capsys, tmp_path: Path, monkeypatch, damage: str):
    import mqtool.quant.reconstruct as rc

    st, sdir = tmp_path / "st", tmp_path / "esr"
    assert run_cli(capsys, "quantize-states", "demo", "-o", str(st))[0] == 0
    args = ["reconstruct", str(st), "--calib-data", "demo", "--samples", "2", "--seqlen", "32", "--epochs", "1",
            "--state-dir", str(sdir), "-o", str(tmp_path / "r"), "--force"]
    with monkeypatch.context() as m:  # keep the state files, as an interrupted run does
        m.setattr(rc, "clear_state_dir", lambda d: None)
        assert run_cli(capsys, *args)[0] == 0
    target = sdir / ("block-0001.safetensors" if damage == "block" else "esr.json")
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    one_line_error(*run_cli(capsys, *args)[::2], str(target), "start over")
