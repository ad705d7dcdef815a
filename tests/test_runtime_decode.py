"""The decode runtime (mqtool.runtime: cache, step, generate) against the simulated model.

On CPU the runtime runs its plain-PyTorch reference path: dequantize the stored codes, step,
quantize back with the simulated quantizer's own function. Its logits must equal the simulated
recurrent model's (the one `mqtool eval --mode recurrent` scores) to fp32 rounding, for both
families and every state method, and its cache must hold only codes and scales.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # the kernels are interpreted on CPU (set before mqtool.kernels is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from conftest import make_config, make_model  # noqa: E402
from mqtool.models.lm import generate  # noqa: E402
from mqtool.quant.states import StateQuantizer  # noqa: E402
from mqtool.runtime import Runtime, StateFormat, pack_int4, unpack_int4  # noqa: E402
from mqtool.runtime.cache import StateCache  # noqa: E402

FAMILIES = ("mamba1", "mamba2", "mamba2_g2")
STATE_METHODS = [None, ("dsq", 8), ("dsq", 4), ("per-channel", 4), ("per-state", 6), ("per-tensor", 4),
                 ("dsq", 3)]


def _model(family: str, state: tuple[str, int] | None):
    model = make_model(make_config(family, d_model=32, n_layer=2)).eval()
    if state is not None:
        for m in model.mixers:
            m.state_quantizer = StateQuantizer(state[1], state[0], "abs.max")
    return model


def test_pack_int4_round_trips_every_code():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)
    p = pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (3, 16)
    assert torch.equal(unpack_int4(p), q)
    assert int(p[0, 0]) == (0x8 | (0x9 << 4))  # -8 -> 0x8 in the low nibble, -7 -> 0x9 in the high


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("state", STATE_METHODS, ids=lambda s: "fp32" if s is None else f"{s[0]}-h{s[1]}")
def test_runtime_logits_equal_simulated_recurrent(family, state):
    torch.manual_seed(0)
    model = _model(family, state)
    ids = torch.randint(0, model.config.vocab_size, (3, 12))
    with torch.inference_mode():
        sim = model(ids, mode="recurrent")
        rt = Runtime(model, state_dtype=None if state else torch.float32)
        got = rt(ids)
    assert rt.fmt.quantized == (state is not None)
    torch.testing.assert_close(got, sim, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_runtime_generate_equals_simulated_generate(family):
    torch.manual_seed(1)
    model = _model(family, ("dsq", 4))
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    want = generate(model, ids, 6)
    got = Runtime(model).generate(ids, 6)
    assert torch.equal(got, want)


def test_prefill_stores_exactly_the_simulated_quantized_state():
    torch.manual_seed(2)
    model = _model("mamba2", ("dsq", 4))
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    sim_cache = model.allocate_cache(2)
    with torch.inference_mode():
        model(ids, mode="parallel", cache=sim_cache)
        rt = Runtime(model)
        cache = rt.allocate_cache(2)
        rt.prefill(ids, cache)
    for (conv, h_sim), lc in zip(sim_cache.layers, cache.layers, strict=True):
        assert torch.equal(lc.conv, conv)
        assert torch.equal(lc.read(), h_sim)  # dequantized codes == the simulated fake-quantized state


@pytest.mark.parametrize("bits,code_bytes", [(4, 0.5), (8, 1.0)])
def test_quantized_cache_holds_codes_and_scales_only(bits, code_bytes):
    model = _model("mamba2", ("dsq", bits))
    cache = StateCache.allocate(model, 3, Runtime(model).fmt)
    m = model.mixers[0]
    values = 3 * m.nheads * m.headdim * m.d_state
    nb = cache.nbytes()
    assert nb["state"] == len(model.mixers) * values * code_bytes
    assert nb["scales"] == len(model.mixers) * 3 * m.nheads * (m.headdim + m.d_state) * 4
    lc = cache.layers[0]
    assert lc.state.dtype == (torch.uint8 if bits <= 4 else torch.int8)
    assert {t.dtype for t in lc} <= {torch.float32, torch.int8, torch.uint8}


def test_float_state_dtype_is_a_choice():
    model = _model("mamba1", None).to(torch.bfloat16)
    assert Runtime(model).fmt == StateFormat(16, torch.bfloat16)
    assert Runtime(model, state_dtype=torch.float32).fmt.dtype == torch.float32
    with pytest.raises(Exception, match="does not apply"):
        Runtime(_model("mamba1", ("dsq", 4)), state_dtype=torch.float32)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("state", [("dsq", 8), ("dsq", 4), ("per-tensor", 4)], ids=lambda s: f"{s[0]}-h{s[1]}")
def test_the_step_runs_the_fused_state_kernels(family, state, monkeypatch):
    """The decode step sends int8 and packed int4 codes of both families through mqtool's kernels
    (interpreted on the CPU) and gets the reference path's logits to fp32 rounding."""
    from mqtool import kernels

    if not (kernels.INTERPRET or torch.cuda.is_available()):
        pytest.skip("mqtool.kernels was imported before TRITON_INTERPRET was set")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(5)
    model = _model(family, state)
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    calls = []
    real = {"state_update": kernels.state_update, "mamba1_state_update": kernels.mamba1_state_update}
    for name, fn in real.items():
        monkeypatch.setattr(kernels, name, lambda *a, fn=fn, **k: calls.append(1) or fn(*a, **k))
    with torch.inference_mode():
        monkeypatch.setenv("MQTOOL_FUSED_STATE", "0")
        want = Runtime(model)(ids)
        assert not calls
        monkeypatch.setenv("MQTOOL_FUSED_STATE", "1")
        got = Runtime(model.to(device))(ids.to(device)).cpu()
    assert len(calls) == model.config.n_layer * ids.shape[1], "the fused kernel did not run every step"
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 2e-3, rel  # codes may differ by one where h / step lands on a tie


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("state", [None, ("dsq", 8), ("dsq", 4), ("per-channel", 4)],
                         ids=lambda s: "float" if s is None else f"{s[0]}-h{s[1]}")
def test_runtime_on_cuda_matches_the_cpu_reference(family, state):
    """The fused CUDA step (mamba-ssm's pieces for float states, mqtool's kernels for codes),
    graph-captured, against the plain-PyTorch reference on the CPU: fp32, same weights."""
    torch.manual_seed(3)
    model = _model(family, state)
    ids = torch.randint(0, model.config.vocab_size, (4, 10))
    fmt = None if state else StateFormat(16, torch.float32)
    with torch.inference_mode():
        want = Runtime(model, state_format=fmt)(ids)
        got = Runtime(model.to("cuda"), state_format=fmt)(ids.cuda()).cpu()
        gen_cpu = Runtime(model.to("cpu"), state_format=fmt).generate(ids[:, :6], 4, cuda_graph=False)
        gen_gpu = Runtime(model.to("cuda"), state_format=fmt).generate(ids[:, :6].cuda(), 4).cpu()
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 2e-3, rel  # codes may differ by one where h / step lands on a tie; TF32 off
    assert (gen_cpu == gen_gpu).float().mean() > 0.9


def test_cli_bench_sweeps_plots_and_reports_cache_bytes(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    import json

    from helpers import run_cli

    fp, h4 = tmp_path / "fp", tmp_path / "h4"
    assert run_cli(capsys, "init", "tiny-mamba2", "-o", str(fp))[0] == 0
    assert run_cli(capsys, "quantize-states", str(fp), "--bits", "4", "-o", str(h4))[0] == 0
    png = tmp_path / "sweep.png"
    code, out, err = run_cli(capsys, "bench", str(fp), str(h4), "--batch", "1,2", "--prompt-len", "4",
                             "--gen-len", "2", "--device", "cpu", "--plot", str(png), "--json")
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert [(r["model"], r["batch"]) for r in rows] == [(str(fp), 1), (str(fp), 2), (str(h4), 1), (str(h4), 2)]
    by = {(r["model"], r["batch"]): r for r in rows}
    # the packed int4 codes take a quarter of the bytes of the fp32 state
    assert by[(str(h4), 2)]["state_bytes"] < by[(str(fp), 2)]["state_bytes"] / 4 * 1.5
    assert by[(str(h4), 2)]["state_format"].startswith("H4 dsq")
    from PIL import Image

    with Image.open(png) as im:
        assert im.size[0] > 500 and im.size[1] > 200
    code, _, err = run_cli(capsys, "bench", str(fp), "--batch", "1,x", "--device", "cpu")
    assert code != 0 and "--batch" in err


@pytest.mark.parametrize("family", FAMILIES)
def test_runtime_logits_equal_simulated_recurrent_with_mixed_state_formats(family):
    """One state quantizer a layer (`quantize-states --method auto`): each layer's cache in its own
    stored form (packed int4 per-channel codes, int8 DSQ codes), and the logits still equal the
    simulated recurrent model's."""
    from mqtool.runtime.cache import MixedStateFormat

    torch.manual_seed(0)
    model = _model(family, None)
    model.mixers[0].state_quantizer = StateQuantizer(4, "per-channel")
    model.mixers[1].state_quantizer = StateQuantizer(8, "dsq", "abs.max")
    ids = torch.randint(0, model.config.vocab_size, (3, 12))
    with torch.inference_mode():
        sim = model(ids, mode="recurrent")
        rt = Runtime(model)
        got = rt(ids)
    assert isinstance(rt.fmt, MixedStateFormat) and rt.fmt.quantized
    assert rt.fmt.describe() == "H4/8 mixed (H4 per-channel x1, H8 dsq abs.max x1)"
    cache = rt.allocate_cache(3)
    assert cache[0].state.dtype == torch.uint8 and cache[1].state.dtype == torch.int8  # packed int4, int8
    torch.testing.assert_close(got, sim, rtol=1e-5, atol=1e-5)
    # every layer alike is one plain format, as before
    model.mixers[0].state_quantizer = StateQuantizer(8, "dsq", "abs.max")
    assert Runtime(model).fmt == StateFormat(8, torch.float32, "dsq", "abs.max")


def test_mixed_state_format_describe_counts_layers():
    from mqtool.runtime.cache import MixedStateFormat

    fmt = MixedStateFormat((StateFormat(4, method="dsq", channel_scale="abs.max"),) * 3
                           + (StateFormat(4, method="per-channel"),))
    assert fmt.describe() == "H4 mixed (dsq abs.max x3, per-channel x1)"
