"""The command line end to end on tiny random models: every stage chains through checkpoint
directories, errors are one line with exit code 2, recipes run and compare tabulates."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from helpers import run_cli
from mqtool.checkpoint import load_model

TEXT = ("The kernel schedules tasks on each CPU. A task that sleeps gives up the processor; "
        "the scheduler then picks the next runnable task from its queue.\n\n") * 60


run = run_cli


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one thread, restored after


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    p = tmp_path / "text.txt"
    p.write_text(TEXT)
    return p


@pytest.fixture
def tokenizer_model(tmp_path: Path):
    """A tiny random checkpoint per family, with its own small byte-level tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    tok_path = tmp_path / "tok.json"
    tok.save(str(tok_path))

    def make(family: str) -> Path:
        from mqtool.checkpoint import Manifest, build_model, model_state_dict, save_checkpoint
        from mqtool.models import MambaConfig

        ssm = {"d_state": 8}
        if family == "mamba2":
            ssm = {"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 16}
        cfg = MambaConfig(d_model=32, n_layer=2, vocab_size=tok.get_vocab_size(), ssm_cfg=ssm)
        torch.manual_seed(0)
        m = build_model(cfg)
        with torch.no_grad():  # a spread of norm weights so folding and smoothing matter
            for name, p in m.named_parameters():
                if name.endswith("norm.weight"):
                    p.mul_(1 + 0.3 * torch.randn_like(p))
        out = tmp_path / family
        save_checkpoint(out, cfg, model_state_dict(m), Manifest(source="test"), tok_path)
        return out

    return make


def eval_ppl(capsys, model: Path, text: Path, mode: str) -> float:
    code, out, err = run(capsys, "eval", str(model), "--tasks", str(text), "--seqlen", "32", "--max-windows", "4",
                         "--mode", mode, "--json", "--device", "cpu")
    assert code == 0, err
    return json.loads(out)["results"][str(text)]["ppl"]


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_eval_modes_agree(capsys, tokenizer_model, text_file, family):
    model = tokenizer_model(family)
    par = eval_ppl(capsys, model, text_file, "parallel")
    rec = eval_ppl(capsys, model, text_file, "recurrent")
    assert abs(par - rec) / par < 1e-3, (par, rec)


@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
def test_stage_chain(capsys, tmp_path, tokenizer_model, text_file, family):
    """calibrate -> rotate (klt) -> calibrate -> smooth (smooth-fused) -> quantize (W4 gptq, A8)
    -> quantize-states: rotation and smoothing keep perplexity; each stage refuses what it must."""
    model = tokenizer_model(family)
    fp = eval_ppl(capsys, model, text_file, "parallel")
    common = ["--device", "cpu"]
    c1, c2, c3 = tmp_path / "c1", tmp_path / "c2", tmp_path / "c3"
    r, s, q, h = tmp_path / "r", tmp_path / "s", tmp_path / "q", tmp_path / "h"
    calib = ["--data", str(text_file), "--samples", "8", "--seqlen", "32", "--state-samples", "2"]
    assert run(capsys, "calibrate", str(model), "-o", str(c1), *calib, *common)[0] == 0
    code, _, err = run(capsys, "rotate", str(model), "--calib", str(c1), "--method", "klt", "-o", str(r), *common)
    assert code == 0, err
    assert abs(eval_ppl(capsys, r, text_file, "parallel") / fp - 1) < 1e-3
    # the calibration belongs to the input checkpoint, not to r
    code, _, err = run(capsys, "smooth", str(r), "--calib", str(c1), "--method", "smooth-fused", "-o", str(s), *common)
    assert code == 2 and "another checkpoint" in err
    assert run(capsys, "calibrate", str(r), "-o", str(c2), *calib, *common)[0] == 0
    code, _, err = run(capsys, "smooth", str(r), "--calib", str(c2), "--method", "smooth-fused", "-o", str(s), *common)
    assert code == 0, err
    assert abs(eval_ppl(capsys, s, text_file, "parallel") / fp - 1) < 1e-3
    assert run(capsys, "calibrate", str(s), "-o", str(c3), *calib, *common)[0] == 0
    code, _, err = run(capsys, "quantize", str(s), "--weights", "4", "--weight-method", "gptq", "--acts", "8",
                       "--calib", str(c3), "-o", str(q), *common)
    assert code == 0, err
    w4 = eval_ppl(capsys, q, text_file, "parallel")
    assert w4 != fp
    code, _, err = run(capsys, "quantize-states", str(q), "--bits", "4", "-o", str(h), *common)
    assert code == 0, err
    manifest = json.loads((h / "mqtool.json").read_text())
    assert [st["stage"] for st in manifest["stages"]] == ["rotate", "smooth", "quantize", "quantize-states"]
    assert manifest["online"]["state_quantizer"]["bits"] == 4
    # auto mode evaluates a state-quantized model in recurrent mode
    code, out, err = run(capsys, "eval", str(h), "--tasks", str(text_file), "--seqlen", "32", "--max-windows", "2",
                         "--json", *common)
    assert code == 0 and json.loads(out)["results"][str(text_file)]["mode"] == "recurrent"
    # refusals: rotate after quantize; an existing output without --force; output == input
    code, _, err = run(capsys, "rotate", str(q), "--method", "hadamard", "-o", str(tmp_path / "x"), *common)
    assert code == 2 and "after `quantize`" in err
    code, _, err = run(capsys, "quantize-states", str(q), "-o", str(h), *common)
    assert code == 2 and "--force" in err
    code, _, err = run(capsys, "quantize-states", str(q), "-o", str(q), "--force", *common)
    assert code == 2 and "input" in err
    # the saved quantized model reloads to the same function
    net, _ = load_model(q)
    ids = torch.randint(0, 100, (1, 20))
    net2, _ = load_model(q)
    assert torch.equal(net(ids), net2(ids))


def test_quantize_ssm_acts(capsys, tmp_path, tokenizer_model, text_file):
    """--ssm-acts: int8 quantizers at the SSM's inputs x, B, C (per token, or per tensor from --calib)."""
    from mqtool.quant.quantizers import ActQuantizer

    code, out, _ = run(capsys, "quantize", "--help")
    assert code == 0 and "--ssm-acts" in out and "--ssm-act-mode" in out and "--ssm-targets" in out
    model = tokenizer_model("mamba2")
    common = ["--device", "cpu"]
    q, c, t = tmp_path / "q", tmp_path / "c", tmp_path / "t"
    code, _, err = run(capsys, "quantize", str(model), "--acts", "8", "--ssm-acts", "8", "-o", str(q), *common)
    assert code == 0, err
    manifest = json.loads((q / "mqtool.json").read_text())
    assert manifest["online"]["ssm_act_quant"] == {"targets": ["ssm_x", "ssm_B", "ssm_C"], "bits": 8,
                                                   "mode": "per_token"}
    assert manifest["online"]["act_quant"]["mode"] == "per_token"
    assert manifest["stages"][-1]["params"]["ssm_activations"] == {"bits": 8, "mode": "per_token"}
    net, _ = load_model(q)
    assert all(isinstance(getattr(m, tap), ActQuantizer) for m in net.mixers for tap in ("ssm_x", "ssm_B", "ssm_C"))
    fp, a8 = eval_ppl(capsys, model, text_file, "parallel"), eval_ppl(capsys, q, text_file, "parallel")
    assert a8 != fp and abs(a8 / fp - 1) < 0.05, (fp, a8)
    # per tensor: static scales from a calibration of the input checkpoint; Δ only when named
    calib = ["--data", str(text_file), "--samples", "4", "--seqlen", "32", "--state-samples", "0"]
    assert run(capsys, "calibrate", str(model), "-o", str(c), *calib, *common)[0] == 0
    code, _, err = run(capsys, "quantize", str(model), "--ssm-acts", "8", "--ssm-act-mode", "per_tensor",
                       "--ssm-targets", "ssm_x,ssm_dt", "--calib", str(c), "-o", str(t), *common)
    assert code == 0, err
    manifest = json.loads((t / "mqtool.json").read_text())
    assert manifest["online"] == {"ssm_act_quant": {"targets": ["ssm_x", "ssm_dt"], "bits": 8, "mode": "per_tensor"}}
    scales = manifest["stages"][-1]["params"]["record"]["ssm_activations"]["scales"]
    assert sorted(scales) == [f"backbone.layers.{i}.mixer.{tap}" for i in (0, 1) for tap in ("ssm_dt", "ssm_x")]
    net, _ = load_model(t)
    assert net.mixers[1].ssm_dt.scale.item() == scales["backbone.layers.1.mixer.ssm_dt"]
    # refusals, one line each: an unknown input; per tensor without statistics; rotate after it
    code, _, err = run(capsys, "quantize", str(model), "--ssm-acts", "8", "--ssm-targets", "ssm_h",
                       "-o", str(tmp_path / "x"), *common)
    assert code == 2 and "unknown SSM activation targets ['ssm_h']" in err
    code, _, err = run(capsys, "quantize", str(model), "--ssm-acts", "8", "--ssm-act-mode", "per_tensor",
                       "-o", str(tmp_path / "x"), *common)
    assert code == 2 and "calibration" in err
    code, _, err = run(capsys, "rotate", str(t), "--method", "hadamard", "-o", str(tmp_path / "x"), *common)
    assert code == 2 and "after `quantize`" in err


def test_recipe_and_compare(capsys, tmp_path, tokenizer_model, text_file):
    model = tokenizer_model("mamba2")
    out = tmp_path / "w4a8"
    code, _, err = run(capsys, "quantize", str(model), "--recipe", "w4a8-klt", "--samples", "4", "--seqlen", "32",
                       "--calib-data", str(text_file), "-o", str(out), "--device", "cpu")
    assert code == 0, err
    stages = [s["stage"] for s in json.loads((out / "mqtool.json").read_text())["stages"]]
    assert stages == ["rotate", "smooth", "quantize"]
    # the closing line says where the time went, stage by stage
    line = " ".join(err.split())  # rich wraps long lines
    assert re.search(r"\(rotate [\d.]+s, smooth [\d.]+s, quantize [\d.]+s\)", line), err
    md, js = tmp_path / "t.md", tmp_path / "t.json"
    code, _, err = run(capsys, "compare", str(model), "--recipes", "w8a8-rtn,w16a16h4-dsq-esr",
                       "--tasks", str(text_file), "--seqlen", "32", "--max-windows", "2", "--samples", "4",
                       "--calib-seqlen", "32", "--calib-data", str(text_file),
                       "--markdown", str(md), "--json-out", str(js), "--device", "cpu")
    assert code == 0, err
    rows = json.loads(js.read_text())["rows"]
    assert [r["recipe"] for r in rows] == ["fp", "w8a8-rtn", "w16a16h4-dsq-esr"]
    assert rows[2]["mode"] == "recurrent"
    # the ESR row carries its per-block losses, one per layer of the model, and says so on stderr
    n_layer = json.loads((model / "config.json").read_text())["n_layer"]
    assert [b["block"] for b in rows[2]["esr_blocks"]] == list(range(n_layer))
    assert all(b["loss_before"] > 0 and b["loss_after"] > 0 for b in rows[2]["esr_blocks"])
    assert "esr_blocks" not in rows[1] and f"of {n_layer} blocks" in err
    stage_seconds = rows[2]["stage_seconds"]
    assert [s["stage"] for s in stage_seconds] == ["quantize-states", "reconstruct"]
    assert sum(s["seconds"] for s in stage_seconds) == pytest.approx(rows[2]["seconds"])
    assert md.read_text().count("\n") == 5


def test_user_recipe_validation(capsys, tmp_path, tokenizer_model):
    model = tokenizer_model("mamba1")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - quantize: {weights: {bits: 8}, colour: blue}\n")
    code, _, err = run(capsys, "quantize", str(model), "--recipe", str(bad), "-o", str(tmp_path / "o"))
    assert code == 2 and "colour" in err
    code, _, err = run(capsys, "quantize", str(model), "--recipe", "no-such-recipe", "-o", str(tmp_path / "o"))
    assert code == 2 and "unknown recipe" in err
    code, out, _ = run(capsys, "recipes")
    assert code == 0 and "w4a8-klt" in out


def test_errors_are_one_line(capsys, tmp_path, tokenizer_model, text_file):
    model = tokenizer_model("mamba1")
    cases = {}
    cases["missing"] = ["eval", str(tmp_path / "nope")]
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    for f in ("config.json", "tokenizer.json"):
        (trunc / f).write_bytes((model / f).read_bytes())
    data = (model / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    cases["truncated"] = ["eval", str(trunc), "--tasks", str(text_file)]
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "hidden_size": 768}))
    cases["bert"] = ["eval", str(bert)]
    cases["task"] = ["eval", str(model), "--tasks", "no-such-task"]
    cases["bad option value"] = ["eval", str(model), "--mode", "bogus"]
    cases["unknown command"] = ["bogus-command"]
    for name, args in cases.items():
        code, out, err = run(capsys, *args)
        assert code == 2, (name, err)
        assert "Traceback" not in err, (name, err)
        if "option" not in name and "command" not in name:  # usage errors print usage + the message
            assert err.strip().startswith("error:") and len(err.strip().splitlines()) == 1, (name, err)


def test_init_and_info(capsys, tmp_path):
    out = tmp_path / "r"
    assert run(capsys, "init", "tiny-mamba2", "-o", str(out))[0] == 0
    code, text, _ = run(capsys, "info", str(out))
    info = json.loads(text)
    assert code == 0 and info["layer"] == "Mamba2" and info["config"]["d_model"] == 64


def test_every_shipped_recipe_parses():
    from mqtool.pipeline import STAGES, available_recipes, load_recipe

    names = available_recipes()
    assert {"w8a8-klt", "w4a8-klt", "w8a8h4-qmamba", "w4a8h4-klt-dsq"} <= set(names)
    for name in names:
        recipe = load_recipe(name)
        assert recipe.stages and all(stage in STAGES for stage, _ in recipe.stages), name


def test_recipe_numbers_in_exponent_form(tmp_path):
    """`lr: 1e-4` is a number in a recipe (plain YAML 1.1 would read it as the string '1e-4')."""
    from mqtool.pipeline import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("stages:\n  - quantize-states: {bits: 4}\n  - reconstruct: {lr: 1e-4, epochs: 1}\n"
                    "  - smooth: {method: smoothquant, alpha: 5E-1}\n")
    stages = dict(load_recipe(path).stages)
    assert stages["reconstruct"]["lr"] == 1e-4 and stages["smooth"]["alpha"] == 0.5
    assert stages["reconstruct"]["epochs"] == 1 and isinstance(stages["reconstruct"]["epochs"], int)


def test_reconstruct_cli_defaults_match_the_library():
    """The CLI spells ESR's defaults out (it does not import torch for --help); they must not drift."""
    import inspect

    from mqtool.cli.stages import reconstruct
    from mqtool.quant.reconstruct import apply_reconstruct

    cli, lib = inspect.signature(reconstruct).parameters, inspect.signature(apply_reconstruct).parameters
    for name in ("epochs", "lr", "batch_size", "seed", "holdout", "restore_worse"):
        assert cli[name].default == lib[name].default, name
    assert cli["train"].default.split(",") == list(lib["train"].default)


def test_esr_summary_survives_a_zero_loss(capsys):
    """A block already exact (loss 0 before) must not crash compare after all its work."""
    from mqtool.cli.evaluation import _esr_summary

    blocks = [{"block": 0, "loss_before": 0.0, "loss_after": 0.0, "kept": True},
              {"block": 1, "loss_before": 2.0, "loss_after": 1.0, "kept": True}]
    out = _esr_summary([{"stage": "reconstruct", "record": {"lr": 3e-5, "blocks": blocks}}])
    assert out == {"esr_blocks": blocks}
    assert "fell in 1 of 2 blocks; - 0.5 (after/before)" in capsys.readouterr().err.replace("\n", " ")


def test_demo_main_job(capsys):
    """The README's main command: the embedded model, quantized by two recipes, offline."""
    code, out, err = run(capsys, "demo", "--recipes", "w8a8-rtn,w16a16h4-dsq")
    assert code == 0, err
    assert "w8a8-rtn" in out and "w16a16h4-dsq" in out and "fp" in out


@pytest.mark.parametrize("bits", [8, 4])
def test_export_equals_simulated(capsys, tmp_path, tokenizer_model, text_file, bits):
    """An exported checkpoint (packed codes + scales) evaluates exactly like the simulated one."""
    model = tokenizer_model("mamba1")
    q, e = tmp_path / "q", tmp_path / "e"
    code, _, err = run(capsys, "quantize", str(model), "--weights", str(bits), "--acts", "8", "-o", str(q))
    assert code == 0, err
    code, _, err = run(capsys, "export", str(q), "-o", str(e))
    assert code == 0, err
    from safetensors.torch import load_file

    stored = load_file(e / "model.safetensors")
    codes = stored["backbone.layers.0.mixer.in_proj.weight_q"]
    assert codes.dtype == (torch.uint8 if bits == 4 else torch.int8)
    assert "backbone.layers.0.mixer.in_proj.weight" not in stored
    assert eval_ppl(capsys, e, text_file, "parallel") == eval_ppl(capsys, q, text_file, "parallel")
    sim, _ = load_model(q)
    exp, _ = load_model(e)
    for (name, a), (_, b) in zip(sim.state_dict().items(), exp.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    # nothing runs on an export but eval / generate
    code, _, err = run(capsys, "quantize-states", str(e), "-o", str(tmp_path / "x"))
    assert code == 2 and "exported" in err
    code, _, err = run(capsys, "export", str(model), "-o", str(tmp_path / "y"))
    assert code == 2 and "no quantized weights" in err


def test_int4_packing_round_trip():
    from mqtool.quant.export import pack_int4, unpack_int4

    q = torch.randint(-8, 8, (5, 12), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.shape == (5, 6) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q)


def test_generate_runs_the_runtime_and_equals_the_simulated_greedy_loop(capsys, tmp_path):
    """`mqtool generate` decodes through the runtime (state in its stored form); on a state-quantized
    checkpoint its text is the simulated model's greedy continuation."""
    from mqtool.data import load_tokenizer
    from mqtool.models.lm import generate

    h4 = tmp_path / "h4"
    assert run_cli(capsys, "quantize-states", "demo", "--bits", "4", "-o", str(h4))[0] == 0
    code, out, err = run_cli(capsys, "generate", str(h4), "--prompt", "The state", "--max-new-tokens", "6")
    assert code == 0, err
    model, ckpt = load_model(h4)
    tok = load_tokenizer(ckpt.path, None)
    ids = torch.tensor([tok.encode("The state")])
    with torch.inference_mode():
        want = tok.decode(generate(model, ids, 6, eos_token_id=tok.eos_id)[0].tolist())
    assert out.strip() == want.strip()
