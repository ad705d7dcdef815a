"""Zero-shot evaluation: lm-eval's request strings for each task file format, log-likelihoods against a
hand computation on a full forward pass, batching and padding invariance, metrics on a model whose
logits are known, the CLI on the demo model and the real task files, and (with lm-eval installed)
the adapter and lm-eval's own task definitions against the built-in scorer."""

from __future__ import annotations

import json
import math
import os
import random
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import run_cli
from mqtool.data import load_tokenizer
from mqtool.errors import MqtoolError
from mqtool.evaluate import zeroshot as zs

DEMO = Path(__file__).resolve().parents[1] / "src" / "mqtool" / "assets" / "demo-mamba2"

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one thread, restored after


def shared_data() -> Path | None:
    """The real data root: $MQTOOL_DATA (CI sets it to ../shared/data), else ../shared/data."""
    env = os.environ.get("MQTOOL_DATA")
    root = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    return root if (root / zs.ZEROSHOT_DIR).is_dir() else None


needs_zeroshot = pytest.mark.skipif(
    shared_data() is None, reason="no zeroshot/ task files under $MQTOOL_DATA (CI sets it to ../shared/data)")


# ---------------------------------------------------------------------------------------------
# Hand-written examples in each file format, and the requests lm-eval makes of them

def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    d = tmp_path / "data" / "zeroshot"
    d.mkdir(parents=True)
    write_jsonl(d / "piqa_valid.jsonl", [
        {"goal": "How do I open a jar?", "sol1": "Twist the lid.", "sol2": "Eat the lid."},
        {"goal": "dresser", "sol1": "replace drawer ", "sol2": "finish,  wood"},
    ])
    (d / "piqa_valid-labels.lst").write_text("0\n1\n")
    write_jsonl(d / "arc_easy.jsonl", [
        {"query": "Question: Which is a gas?", "choices": ["rock", "steam", "ice", "wood"], "gold": 1},
    ])
    write_jsonl(d / "arc_challenge.jsonl", [  # the Hugging Face schema is read too
        {"question": "Why?", "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]}, "answerKey": "3"},
    ])
    write_jsonl(d / "openbook_qa.jsonl", [
        {"query": "Fog is most likely around:", "choices": ["a marsh", "a desert"], "gold": 0},
    ])
    write_jsonl(d / "hellaswag_validation.jsonl", [
        {"ind": 4, "activity_label": "Home and Garden", "ctx_a": "[header] How to  plant bulbs [title] Dig a hole.",
         "ctx_b": "then YOU", "endings": ["[step] water  it.", " add soil [title] Done "], "label": "1"},
    ])
    write_jsonl(d / "winogrande_xl_validation.jsonl", [
        {"sentence": "Sarah was a better surgeon than Maria so _ got the harder cases.",
         "option1": "Sarah", "option2": "Maria", "answer": "1"},
    ])
    write_jsonl(d / "lambada_openai.jsonl", [
        {"context": "I don't care about", "continuation": "signs"},
        {"context": "She returned and saw the", "continuation": "\n\nrecorder"},
    ])
    return d.parent


EXPECTED = {
    "piqa": [
        (("Question: How do I open a jar?\nAnswer:", " Twist the lid."),
         ("Question: How do I open a jar?\nAnswer:", " Eat the lid."), 0),
        (("Question: dresser\nAnswer:", " replace drawer "), ("Question: dresser\nAnswer:", " finish,  wood"), 1),
    ],
    "arc_easy": [
        tuple(("Question: Which is a gas?\nAnswer:", " " + c) for c in ("rock", "steam", "ice", "wood")) + (1,),
    ],
    "arc_challenge": [tuple(("Question: Why?\nAnswer:", " " + c) for c in "abc") + (2,)],
    "openbookqa": [(("Fog is most likely around:", " a marsh"), ("Fog is most likely around:", " a desert"), 0)],
    # " [title]" -> ". ", [brackets] dropped, one pass of double spaces, ctx_b capitalized; the strip comes
    # first, so "[step] water  it." keeps the space the bracket leaves: "  water it." after the delimiter
    "hellaswag": [(("Home and Garden: How to plant bulbs. Dig a hole. Then you", "  water it."),
                   ("Home and Garden: How to plant bulbs. Dig a hole. Then you", " add soil. Done"), 1)],
    # partial scoring: the option closes the context, the rest of the sentence is the continuation
    "winogrande": [(("Sarah was a better surgeon than Maria so Sarah", " got the harder cases."),
                    ("Sarah was a better surgeon than Maria so Maria", " got the harder cases."), 0)],
    "lambada_openai": [(("I don't care about", " signs"), 0), (("She returned and saw the", " \n\nrecorder"), 0)],
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_requests_follow_lm_eval(data_root: Path, name: str) -> None:
    task = zs.load_task(name, data_root)
    got = [(*ex.requests, ex.gold) for ex in task.examples]
    assert got == EXPECTED[name]
    assert task.metrics == {"winogrande": ("acc",), "lambada_openai": ("acc", "perplexity")}.get(
        name, ("acc", "acc_norm"))


def test_limit_aliases_and_errors(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert len(zs.load_task("piqa", data_root, limit=1).examples) == 1
    assert zs.parse_tasks("openbook_qa, piqa,lambada,piqa") == ["openbookqa", "piqa", "lambada_openai"]
    with pytest.raises(MqtoolError, match="unknown zero-shot task 'nope'"):
        zs.parse_tasks("piqa,nope")
    monkeypatch.delenv("MQTOOL_DATA", raising=False)
    with pytest.raises(MqtoolError, match="--data-dir or MQTOOL_DATA"):
        zs.load_task("piqa")
    with pytest.raises(MqtoolError, match="no zeroshot/ folder"):
        zs.load_task("piqa", tmp_path)
    (data_root / "zeroshot" / "piqa_valid-labels.lst").write_text("0\n")
    with pytest.raises(MqtoolError, match="1 labels for 2 examples"):
        zs.load_task("piqa", data_root)


def test_encode_pair_splits_at_the_continuation() -> None:
    tok = load_tokenizer(DEMO)
    ctx, cont = zs.encode_pair(tok, "Question: What is a pipe?\nAnswer:", " a file")
    assert ctx == tok.encode("Question: What is a pipe?\nAnswer:")
    assert ctx + cont == tok.encode("Question: What is a pipe?\nAnswer: a file")
    assert tok.decode(cont) == " a file"
    # trailing spaces of the context move to the continuation, as lm-eval does
    assert zs.encode_pair(tok, "the kernel ", "module") == zs.encode_pair(tok, "the kernel", " module")
    # an empty context is the end-of-text token
    assert zs.encode_pair(tok, "", " x") == ([tok.eos_id], tok.encode(" x"))


# ---------------------------------------------------------------------------------------------
# Log-likelihoods on tiny random models


def random_pairs(n: int, vocab: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    return [([rng.randrange(vocab) for _ in range(rng.randint(1, 19))],
             [rng.randrange(vocab) for _ in range(rng.randint(1, 6))]) for _ in range(n)]


def hand_loglikelihood(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """One unpadded forward pass of context + continuation, summed by hand."""
    with torch.no_grad():
        logits = model(torch.tensor([ctx + cont]))[0, :, : model.config.vocab_size].double()
    total, greedy = 0.0, True
    for j, tok in enumerate(cont):
        row = logits[len(ctx) - 1 + j]
        total += float(row[tok] - torch.logsumexp(row, 0))
        greedy &= int(row.argmax()) == tok
    return total, greedy


@pytest.mark.parametrize("fam", ["mamba1", "mamba2"])
def test_loglikelihood_equals_hand_sum(config_factory, model_factory, fam: str) -> None:
    model = model_factory(config_factory(fam))
    pairs = random_pairs(12, model.config.vocab_size)
    got = zs.loglikelihood_tokens(model, pairs, batch_size=5)
    for (ctx, cont), (ll, greedy) in zip(pairs, got, strict=True):
        want, want_greedy = hand_loglikelihood(model, ctx, cont)
        assert ll == pytest.approx(want, abs=1e-4)
        assert greedy == want_greedy
    # a padding row of the vocabulary (101 real ids, 104 rows) never takes probability mass
    assert model.lm_head.weight.shape[0] > model.config.vocab_size


@pytest.mark.parametrize("fam", ["mamba1", "mamba2"])
def test_batching_padding_and_order_do_not_change_results(config_factory, model_factory, fam: str) -> None:
    model = model_factory(config_factory(fam))
    pairs = random_pairs(11, model.config.vocab_size, seed=1)
    one = zs.loglikelihood_tokens(model, pairs, batch_size=1)  # no padding at all
    for bs in (3, 11):
        many = zs.loglikelihood_tokens(model, pairs, batch_size=bs)
        assert [g for _, g in many] == [g for _, g in one]
        assert [ll for ll, _ in many] == pytest.approx([ll for ll, _ in one], abs=1e-5)
    perm = list(range(len(pairs)))
    random.Random(2).shuffle(perm)
    shuffled = zs.loglikelihood_tokens(model, [pairs[i] for i in perm], batch_size=4)
    assert shuffled == [zs.loglikelihood_tokens(model, pairs, batch_size=4)[i] for i in perm]  # deterministic
    rec = zs.loglikelihood_tokens(model, pairs, batch_size=4, mode="recurrent")
    assert [ll for ll, _ in rec] == pytest.approx([ll for ll, _ in one], abs=1e-4)


def test_inputs_cut_from_the_left_at_max_length(config_factory, model_factory) -> None:
    model = model_factory(config_factory("mamba2"))
    ctx, cont = list(range(1, 21)), [7, 8, 9]
    got = zs.loglikelihood_tokens(model, [(ctx, cont)], max_length=10)[0]
    # lm-eval: (context + continuation)[-(max_length + 1):][:-1] is the input
    kept = (ctx + cont)[-11:]
    want = hand_loglikelihood(model, kept[:-3], cont)
    assert got[0] == pytest.approx(want[0], abs=1e-4)
    with pytest.raises(MqtoolError, match="longer than max_length"):
        zs.loglikelihood_tokens(model, [(ctx, list(range(12)))], max_length=10)


# ---------------------------------------------------------------------------------------------
# A model whose logits are known: the next character should be the current one + 1


V, S = 128, 5.0
RIGHT = S - math.log(math.exp(S) + V - 1)  # log-probability of the successor
WRONG = -math.log(math.exp(S) + V - 1)  # of any other character


class CharTokenizer:
    eos_id = 0
    path = "chars"

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids) -> str:
        return "".join(chr(i) for i in ids)


class SuccessorLM(nn.Module):
    """logits[t] = S at (id[t] + 1) mod V, 0 elsewhere; with the state-cache interface of
    MambaLMHeadModel (the cache holds the last token)."""

    def __init__(self) -> None:
        super().__init__()
        self.config = type("Config", (), {"vocab_size": V})()
        self.dummy = nn.Parameter(torch.zeros(1))

    def _logits(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot((ids + 1) % V, V).float() * S

    def forward(self, ids: torch.Tensor, mode: str = "parallel", cache=None) -> torch.Tensor:
        return self._logits(ids)

    def allocate_cache(self, batch: int):
        return None

    def step(self, ids: torch.Tensor, cache) -> torch.Tensor:
        return self._logits(ids)


def test_metrics_on_a_known_model() -> None:
    model, tok = SuccessorLM(), CharTokenizer()
    mc = zs.ZeroShotTask("toy", "multiple_choice", ("acc", "acc_norm"), [
        # "defz" = 3 right + 1 wrong: loses to "q" (1 wrong) in total, wins per character
        zs.Example((("abc", "defz"), ("abc", "q")), gold=0, choices=("defz", "q")),
        zs.Example((("abc", "de"), ("abc", "xy")), gold=0, choices=("de", "xy")),
        zs.Example((("lmn", "o"), ("lmn", "o")), gold=1, choices=("o", "o")),  # a tie goes to the first
    ])
    res = zs.evaluate(model, tok, mc, batch_size=2)
    assert res.metrics == {"acc": pytest.approx(1 / 3), "acc_norm": pytest.approx(2 / 3)}
    assert res.stderr["acc"] == pytest.approx(math.sqrt(1 / 3 / 3))  # sample std (n - 1) / sqrt(n)
    assert (res.n, res.requests) == (3, 6)
    scores = zs.loglikelihood_tokens(model, [zs.encode_pair(tok, "abc", "defz")])
    assert scores[0][0] == pytest.approx(3 * RIGHT + WRONG, abs=1e-5)

    lam = zs.ZeroShotTask("toy", "loglikelihood", ("acc", "perplexity"), [
        zs.Example((("abc", "de"),)), zs.Example((("abc", "dx"),)),
    ])
    res = zs.evaluate(model, tok, lam)
    assert res.metrics["acc"] == 0.5  # "de" is the greedy continuation of "abc", "dx" is not
    assert res.metrics["perplexity"] == pytest.approx(math.exp(-(2 * RIGHT + RIGHT + WRONG) / 2), rel=1e-5)


def test_progress_callback_counts_requests(data_root: Path) -> None:
    task = zs.ZeroShotTask("toy", "multiple_choice", ("acc",),
                           [zs.Example((("ab", "c"), ("ab", "d"), ("ab", "e")), 0, ("c", "d", "e"))] * 3)
    seen: list[int] = []
    zs.evaluate(SuccessorLM(), CharTokenizer(), task, batch_size=4, on_batch=seen.append)
    assert seen == [4, 4, 1]


# ---------------------------------------------------------------------------------------------
# The command line


@needs_zeroshot
def test_cli_demo_two_tasks(capsys, tmp_path: Path) -> None:
    out_json = tmp_path / "zs.json"
    code, out, err = run_cli(capsys, "zeroshot", "demo", "--tasks", "piqa,arc_easy", "--limit", "3", "--device",
                             "cpu", "--data-dir", str(shared_data()), "--json", str(out_json))
    assert code == 0, err
    assert "piqa" in out and "arc_easy" in out and "acc_norm" in out
    res = json.loads(out_json.read_text())["results"]
    assert (res["piqa"]["n"], res["piqa"]["requests"]) == (3, 6)
    assert (res["arc_easy"]["n"], res["arc_easy"]["requests"]) == (3, 12)
    for r in res.values():
        for v in r["metrics"].values():
            assert v in (0.0, 1 / 3, 2 / 3, 1.0)
    # the same numbers as the library on the same examples
    from mqtool.checkpoint import load_model

    net, _ = load_model(DEMO)
    direct = zs.evaluate(net, load_tokenizer(DEMO), zs.load_task("arc_easy", shared_data(), 3))
    assert res["arc_easy"]["metrics"] == direct.metrics


def test_cli_errors_are_one_line(capsys, data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run_cli(capsys, "zeroshot", "demo", "--tasks", "piqa,nope", "--data-dir", str(data_root))
    assert code == 2 and err.startswith("error: unknown zero-shot task 'nope'") and err.count("\n") == 1
    monkeypatch.delenv("MQTOOL_DATA", raising=False)
    code, _, err = run_cli(capsys, "zeroshot", "demo", "--tasks", "piqa")
    assert code == 2 and "--data-dir or MQTOOL_DATA" in err and err.count("\n") == 1
    # without lm-eval, the lm-eval backend says how to get it
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    monkeypatch.delitem(sys.modules, "mqtool.evaluate.lm_eval_adapter", raising=False)
    code, _, err = run_cli(capsys, "zeroshot", "demo", "--tasks", "piqa", "--limit", "1", "--device", "cpu",
                           "--data-dir", str(data_root), "--backend", "lm-eval")
    assert code == 2 and "pip install mqtool[eval]" in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# lm-eval: the adapter, and lm-eval's own task definitions against ours


@pytest.fixture
def lm_eval_mod():
    return pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install mqtool[eval])")


@pytest.mark.parametrize("name", list(EXPECTED))
def test_lm_eval_builds_the_same_requests(lm_eval_mod, data_root: Path, name: str) -> None:
    from mqtool.evaluate.lm_eval_adapter import lm_eval_task

    task = lm_eval_task(name, zs.load_docs(name, data_root))
    task.build_all_requests(limit=None, rank=0, world_size=1)
    theirs: dict[int, list] = {}
    for inst in sorted(task.instances, key=lambda i: (i.doc_id, i.idx)):
        theirs.setdefault(inst.doc_id, []).append(tuple(inst.arguments))
    ours = [list(ex.requests) for ex in zs.load_task(name, data_root).examples]
    assert [theirs[i] for i in sorted(theirs)] == ours


def test_adapter_matches_the_scorer(lm_eval_mod, config_factory, model_factory) -> None:
    from lm_eval.api.instance import Instance

    from mqtool.evaluate.lm_eval_adapter import MqtoolLM

    tok = load_tokenizer(DEMO)
    model = model_factory(config_factory("mamba2", vocab_size=tok.vocab_size, d_model=32))
    lm = MqtoolLM(model, tok, batch_size=3)
    reqs = [("Question: What is a pipe?\nAnswer:", " a file"), ("The kernel ", "module"), ("", " hello world"),
            ("A long context about memory pages and the scheduler.", " It")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(reqs)])
    want = zs.loglikelihood_tokens(model, [zs.encode_pair(tok, c, x) for c, x in reqs])
    assert [g for _, g in got] == [g for _, g in want]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in want], abs=1e-6)
    # rolling: the whole string after the end-of-text token, in one window or in several
    text = "The scheduler picks the next runnable task from its queue."
    ids = tok.encode(text)
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    assert rolling == pytest.approx(hand_loglikelihood(model, [tok.eos_id], ids)[0], abs=1e-4)
    short = MqtoolLM(model, tok, max_length=4).loglikelihood_rolling([Instance("loglikelihood_rolling", {},
                                                                               (text,), 0)])[0]
    assert math.isfinite(short) and short != pytest.approx(rolling, abs=1e-3)


def test_adapter_generates_greedily(lm_eval_mod, config_factory, model_factory) -> None:
    from lm_eval.api.instance import Instance

    from mqtool.evaluate.lm_eval_adapter import MqtoolLM

    lm = MqtoolLM(SuccessorLM(), CharTokenizer())
    reqs = [Instance("generate_until", {}, ("abc", {"until": ["h"], "max_gen_toks": 10}), 0),
            Instance("generate_until", {}, ("xy", {"until": "\n", "max_gen_toks": 3}), 1)]
    assert lm.generate_until(reqs) == ["defg", "z{|"]
    # on a real model: the tokens of mqtool.models.generate, up to the end-of-text token
    from mqtool.models import generate

    tok = load_tokenizer(DEMO)
    model = model_factory(config_factory("mamba2", vocab_size=tok.vocab_size))
    ids = tok.encode("The kernel")
    new = generate(model, torch.tensor([ids]), 6)[0, len(ids):].tolist()
    new = new[: new.index(tok.eos_id)] if tok.eos_id in new else new
    got = MqtoolLM(model, tok).generate_until(
        [Instance("generate_until", {}, ("The kernel", {"until": [], "max_gen_toks": 6}), 0)])
    assert got == [tok.decode(new)]


@needs_zeroshot
def test_cli_lm_eval_backend_equals_builtin(lm_eval_mod, capsys, tmp_path: Path) -> None:
    metrics = {}
    for backend in ("builtin", "lm-eval"):
        path = tmp_path / f"{backend}.json"
        code, _, err = run_cli(capsys, "zeroshot", "demo", "--tasks", "winogrande,lambada_openai", "--limit", "3",
                               "--device", "cpu", "--data-dir", str(shared_data()), "--backend", backend,
                               "--json", str(path))
        assert code == 0, err
        metrics[backend] = {k: r["metrics"] for k, r in json.loads(path.read_text())["results"].items()}
    assert metrics["lm-eval"].keys() == metrics["builtin"].keys()
    for task, m in metrics["builtin"].items():
        assert metrics["lm-eval"][task] == pytest.approx(m, rel=1e-9)
