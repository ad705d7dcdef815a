"""The integer inference path (mqtool.runtime): exported checkpoints run on the integer kernels
give the simulated model's logits up to fp32 rounding; `eval --kernels` and `bench` end to end.

On CPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set before mqtool.kernels
is imported); on CUDA they are compiled. Tiny models (d_model 64, so every K is a multiple of 32
except Mamba-1's dt_proj, K = dt_rank = 4, which stays per channel and takes the masked K tile).
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from functools import partial
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # set before mqtool.kernels is imported (see test_kernels_act_quant)
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from conftest import make_config, make_model  # noqa: E402  (tests/ is on sys.path under pytest)
from helpers import run_cli
from mqtool import kernels  # noqa: E402
from mqtool.checkpoint import Manifest, load_model, model_state_dict, save_checkpoint  # noqa: E402
from mqtool.errors import MqtoolError  # noqa: E402
from mqtool.kernels._common import interpreter_problem  # noqa: E402
from mqtool.models.layers import Linear  # noqa: E402
from mqtool.pipeline import run_stage, weight_specs  # noqa: E402
from mqtool.quant.export import export_state_dict  # noqa: E402
from mqtool.quant.quantizers import ActQuantizer, quantize_per_tensor  # noqa: E402
from mqtool.quant.weights import apply_quantize  # noqa: E402
from mqtool.runtime import IntLinear, benchmark, kernel_backend, load_integer_model  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ON_KERNELS = DEVICE == "cuda" or kernels.INTERPRET  # else mqtool.kernels was imported first: the references
needs_kernels = pytest.mark.skipif(not ON_KERNELS or interpreter_problem() is not None,
                                   reason=interpreter_problem() or "mqtool.kernels was imported before "
                                   "TRITON_INTERPRET was set: the kernels would not run")

#: normwise bounds on max|int - sim| / max|sim|: of the logits when every activation code agrees
#: (measured <= 5e-7 on CPU), and of one linear's output on the same input (measured <= 5e-7)
RTOL = 1e-5
LINEAR_RTOL = 2e-6
BATCH, SEQ, REC_SEQ = 2, 9, 5  # 9 crosses Mamba-2's chunk of 8; the interpreter is slow, so keep it short


pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one thread, restored after


def _export(tmp_path: Path, family: str, bits: int, group_size: int | None, rotate: bool = False,
            per_tensor_absmax: float | None = None, acts: int | None = 8) -> tuple[Path, Path]:
    """A tiny random model quantized W{bits}A{acts} (RTN, per token unless `per_tensor_absmax`),
    saved simulated and exported as `mqtool export` writes it. Returns (simulated dir, exported dir)."""
    model = make_model(make_config(family, d_model=64))
    online: dict = {}
    stages = []
    if rotate:  # online Hadamard at out_proj (and x_proj for Mamba-1): IntLinear keeps input_transform
        targets = ["out_proj", "x_proj"] if family == "mamba1" else ["out_proj"]
        params = {"method": "hadamard", "online_targets": targets, "seed": 0}
        stages.append({"stage": "rotate", "params": {**params, "record": run_stage(model, online, "rotate", params)}})
    rec = apply_quantize(model, online, None, weights={"bits": bits, "group_size": group_size},
                         activations={"bits": acts, "mode": "per_token"} if acts else None)
    if per_tensor_absmax is not None:  # static scales, as a calibrated per_tensor quantize would set them
        online["act_quant"]["mode"] = "per_tensor"
        quantized = [m for m in model.modules()
                     if isinstance(m, Linear) and isinstance(m.input_quantizer, ActQuantizer)]
        for i, lin in enumerate(quantized):
            lin.input_quantizer = ActQuantizer(8, "per_tensor", (per_tensor_absmax + 0.1 * i) / 127)
    stages.append({"stage": "quantize", "params": {"record": rec}})
    manifest = Manifest(source="test", online=online, stages=stages)
    sim_dir = save_checkpoint(tmp_path / "sim", model.config, model_state_dict(model), manifest)
    specs = weight_specs(manifest.stages)
    manifest.exported = True
    manifest.quant["weights"] = specs
    exp_dir = save_checkpoint(tmp_path / "exp", model.config, export_state_dict(model_state_dict(model), specs),
                              manifest)
    return sim_dir, exp_dir


def _rel_err(ref: torch.Tensor, got: torch.Tensor) -> float:
    """Normwise: max |got - ref| / max |ref|."""
    assert got.shape == ref.shape and got.dtype == ref.dtype
    return float((got - ref).abs().max() / ref.abs().max())


def _codes(x: torch.Tensor, static_scale: torch.Tensor | None, bits: int) -> torch.Tensor:
    return kernels.act_quant_ref(x, bits)[0] if static_scale is None else quantize_per_tensor(x, static_scale, bits)


def _compare(sim_dir: Path, exp_dir: Path, modes=("parallel", "recurrent")) -> dict[str, dict]:
    """Runs the simulated and the integer model on the same tokens. Per mode: `logits` (normwise
    error of the logits), `flips` / `codes` (activation codes that differ between the two runs, of
    all codes quantized) and, in parallel mode, `linear` (the worst normwise error of one IntLinear
    fed the very input its simulated twin saw).

    A flip is no bug: the two paths round differently in fp32 (the integer one rescales an exact
    int32 sum, the simulated one sums rounded products), and an activation within that rounding of
    a half-step boundary gets the neighbouring code downstream; one flipped code then moves its
    linear's output by one quantization step, far above fp32 rounding."""
    sim, _ = load_model(sim_dir, device=DEVICE)
    integer, _ = load_integer_model(exp_dir, device=DEVICE)
    n_int = sum(isinstance(m, IntLinear) for m in integer.modules())
    assert n_int == len(Manifest.from_dict(json.loads((exp_dir / "mqtool.json").read_text())).quant["weights"])
    assert not any(isinstance(m, IntLinear) for m in sim.modules())
    ids = torch.randint(0, sim.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    stats = {mode: _run_pair(sim, integer, (ids if mode == "parallel" else ids[:, :REC_SEQ]).to(DEVICE), mode)
             for mode in modes}
    print(stats)  # shown with pytest -s
    return stats


@torch.inference_mode()
def _run_pair(sim, integer, x: torch.Tensor, mode: str) -> dict:
    sim_codes: dict[str, list] = defaultdict(list)
    int_codes: dict[str, list] = defaultdict(list)
    linear_err = [0.0]

    def on_sim(lin, args, y, name):
        aq = lin.input_quantizer
        sim_codes[name].append(_codes(lin.input_transform(args[0]), aq.scale, aq.bits))
        if mode == "parallel":  # the integer twin on the same input
            linear_err[0] = max(linear_err[0], _rel_err(y, integer.get_submodule(name)(args[0])))

    def on_int(transform, args, y, lin, name):
        int_codes[name].append(_codes(y, lin.act_scale, lin.act_bits))

    hooks = [m.register_forward_hook(partial(on_sim, name=n)) for n, m in sim.named_modules()
             if isinstance(m, Linear) and isinstance(m.input_quantizer, ActQuantizer)]
    ref = sim(x, mode=mode)
    for h in hooks:
        h.remove()
    hooks = [m.input_transform.register_forward_hook(partial(on_int, lin=m, name=n))
             for n, m in integer.named_modules() if isinstance(m, IntLinear)]
    got = integer(x, mode=mode)
    for h in hooks:
        h.remove()
    assert sim_codes.keys() == int_codes.keys()
    pairs = [(a, b) for n in sim_codes for a, b in zip(sim_codes[n], int_codes[n], strict=True)]
    st = {"logits": _rel_err(ref, got), "flips": sum(int((a != b).sum()) for a, b in pairs),
          "codes": sum(a.numel() for a, _ in pairs)}
    if mode == "parallel":
        st["linear"] = linear_err[0]
    return st


def _check(stats: dict[str, dict]) -> None:
    for mode, st in stats.items():
        assert st.get("linear", 0.0) < LINEAR_RTOL, f"{mode}: one linear on the same input: {st}"
        if st["flips"] == 0:  # the same codes everywhere: the logits differ by compounded fp32 rounding
            assert st["logits"] < RTOL, f"{mode}: {st}"
        else:  # codes moved by one step (see _compare), and each flip perturbs what follows enough to
            # flip more: still close (the demo model, 2 x 256 tokens: 0.2% flipped, logits 3.6e-3), not
            # within rounding; the same-input check above is what vouches for each linear then
            assert st["flips"] <= 1e-2 * st["codes"] and st["logits"] < 2e-2, f"{mode}: {st}"


@needs_kernels
@pytest.mark.parametrize("family", ["mamba1", "mamba2"])
@pytest.mark.parametrize(("bits", "group_size"), [(8, None), (8, 32), (4, None), (4, 32)],
                         ids=["w8a8", "w8a8-g32", "w4a8", "w4a8-g32"])
def test_integer_logits_match_simulated(tmp_path, family, bits, group_size):
    sim_dir, exp_dir = _export(tmp_path, family, bits, group_size)
    integer, _ = load_integer_model(exp_dir, device=DEVICE)
    lin = integer.backbone.layers[0].mixer.in_proj
    assert isinstance(lin, IntLinear) and lin.packed == (bits == 4) and lin.group_size == group_size
    assert lin.weight_q.dtype == (torch.uint8 if bits == 4 else torch.int8)
    assert kernel_backend(integer) in ("triton", "triton-interpreter")
    _check(_compare(sim_dir, exp_dir))


@needs_kernels
def test_online_hadamard_static_scales_and_narrow_acts(tmp_path):
    """The online Hadamard stays in front of the integer linear; static per-tensor activation scales
    (small enough that some activations saturate) run as a broadcast per-token scale; activations
    narrower than 8 bits are int8 codes on a smaller grid."""
    sim_dir, exp_dir = _export(tmp_path / "h", "mamba1", 4, 32, rotate=True)
    integer, _ = load_integer_model(exp_dir)
    assert type(integer.backbone.layers[0].mixer.out_proj.input_transform).__name__ == "OnlineHadamard"
    _check(_compare(sim_dir, exp_dir, ("parallel",)))
    sim_dir, exp_dir = _export(tmp_path / "t", "mamba2", 8, None, per_tensor_absmax=0.5)
    integer, _ = load_integer_model(exp_dir)
    assert integer.backbone.layers[1].mixer.in_proj.act_scale is not None
    _check(_compare(sim_dir, exp_dir, ("parallel",)))
    sim_dir, exp_dir = _export(tmp_path / "a6", "mamba1", 8, 32, acts=6)
    integer, _ = load_integer_model(exp_dir)
    assert integer.backbone.layers[0].mixer.x_proj.act_bits == 6
    _check(_compare(sim_dir, exp_dir, ("parallel",)))


def test_refuses_what_has_no_integer_form(tmp_path):
    sim_dir, exp_dir = _export(tmp_path, "mamba2", 4, None, acts=None)  # weight-only: W4A16
    with pytest.raises(MqtoolError, match="mqtool export"):
        load_integer_model(sim_dir)
    with pytest.raises(MqtoolError, match="activation quantizer"):
        load_integer_model(exp_dir)


def test_int_linear_checks_its_codes():
    q = torch.zeros(8, 16, dtype=torch.int8)
    with pytest.raises(MqtoolError, match="inputs"):
        IntLinear(q, torch.ones(8, 1), 8, None, in_features=32)
    with pytest.raises(MqtoolError, match="scales"):
        IntLinear(q, torch.ones(8, 3), 8, 8, in_features=16)
    with pytest.raises(MqtoolError, match="packed"):
        IntLinear(q.to(torch.uint8), torch.ones(8, 1), 8, None, in_features=32)
    lin = IntLinear(q.to(torch.uint8), torch.ones(8, 2), 4, 16, in_features=32)
    assert lin.group_size == 16 and lin.packed


# ------------------------------------------------------------------------------------ CLI

run = run_cli


def test_benchmark_fields(tmp_path):
    sim_dir, exp_dir = _export(tmp_path, "mamba2", 4, 32)
    model, _ = load_integer_model(exp_dir)
    res = benchmark(model, batch=2, prompt_len=8, gen_len=3)
    assert res["kernels"] and res["integer_linears"] == 4 and res["kernel_backend"] is not None
    assert res["weight_bytes"] > res["integer_weight_bytes"] > 0
    sim, _ = load_model(sim_dir)
    assert benchmark(sim, batch=1, prompt_len=4, gen_len=1)["weight_bytes"] > res["weight_bytes"]


@needs_kernels
def test_cli_eval_kernels_and_bench(capsys, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    sim_dir, exp_dir = _export(tmp_path, "mamba1", 8, None)
    # a byte-level tokenizer within the tiny model's vocabulary (101)
    text = "the state space model scans the sequence; the scan is linear in time.\n" * 40
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=60))
    assert tok.get_vocab_size() <= 101
    for d in (sim_dir, exp_dir):
        tok.save(str(d / "tokenizer.json"))
    data = tmp_path / "text.txt"
    data.write_text(text)
    common = ["--tasks", str(data), "--seqlen", "16", "--max-windows", "2", "--device", DEVICE, "--json"]
    code, out, err = run(capsys, "eval", str(exp_dir), "--kernels", *common)
    assert code == 0, err
    ppl_int = json.loads(out)["results"][str(data)]["ppl"]
    code, out, err = run(capsys, "eval", str(sim_dir), *common)
    assert code == 0, err
    ppl_sim = json.loads(out)["results"][str(data)]["ppl"]
    assert ppl_int == pytest.approx(ppl_sim, rel=1e-5)
    code, _, err = run(capsys, "eval", str(sim_dir), "--kernels", *common)
    assert code == 2 and "mqtool export" in err

    for flag in ("--kernels", "--no-kernels"):
        code, out, err = run(capsys, "bench", str(exp_dir), flag, "--batch", "2", "--prompt-len", "6",
                             "--gen-len", "2", "--device", DEVICE, "--json")
        assert code == 0, err
        res = json.loads(out)["rows"][0]
        assert res["kernels"] == (flag == "--kernels")
        for key in ("prefill_seconds", "prefill_tokens_per_s", "decode_seconds", "decode_ms_per_step",
                    "decode_tokens_per_s", "weight_bytes", "state_cache_bytes", "peak_memory_bytes"):
            assert isinstance(res[key], (int, float)) and res[key] > 0, key
    code, out, err = run(capsys, "bench", str(exp_dir), "--kernels", "--prompt-len", "4", "--gen-len", "1",
                         "--device", DEVICE)
    assert code == 0, err
    assert "decode steps" in out  # the table (its columns may be cut to the terminal width)
