"""Zero-shot evaluation through lm-eval: the local task files in the Hugging Face schemas lm-eval's
tasks read (no lm-eval needed), the command's one-line errors, and, with lm-eval installed, the
requests lm-eval's own task definitions make of the local files, the "mqtool" model in lm-eval's
registry, the adapter against the scorer, and the command on the demo model and the real files."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import run_cli
from mqtool.data import load_tokenizer
from mqtool.errors import MqtoolError
from mqtool.evaluate import zeroshot as zs
from mqtool.evaluate.loglikelihood import loglikelihood_tokens

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
# Hand-written examples in each file format, the HF schema they become, and the requests lm-eval
# makes of them

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


HF_DOCS = {
    "piqa": [{"goal": "How do I open a jar?", "sol1": "Twist the lid.", "sol2": "Eat the lid.", "label": 0},
             {"goal": "dresser", "sol1": "replace drawer ", "sol2": "finish,  wood", "label": 1}],
    "arc_easy": [{"question": "Which is a gas?", "choices": {"text": ["rock", "steam", "ice", "wood"],
                                                             "label": ["A", "B", "C", "D"]}, "answerKey": "B"}],
    "arc_challenge": [{"question": "Why?", "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]},
                       "answerKey": "3"}],
    "openbookqa": [{"question_stem": "Fog is most likely around:",
                    "choices": {"text": ["a marsh", "a desert"], "label": ["A", "B"]}, "answerKey": "A"}],
    "lambada_openai": [{"text": "I don't care about signs"}, {"text": "She returned and saw the \n\nrecorder"}],
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_local_files_in_the_hf_schema(data_root: Path, name: str) -> None:
    path = zs.local_file(name, data_root)
    assert path == data_root / "zeroshot" / zs.TASKS[name].file
    docs = zs.hf_docs(name, path)
    if name in HF_DOCS:
        assert docs == HF_DOCS[name]
    else:  # hellaswag and winogrande are read as they are
        assert docs == [json.loads(line) for line in path.read_text().splitlines()]


def test_task_names_and_errors(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert zs.parse_tasks("openbook_qa, piqa,lambada,piqa") == ["openbookqa", "piqa", "lambada_openai"]
    with pytest.raises(MqtoolError, match="unknown zero-shot task 'nope'"):
        zs.parse_tasks("piqa,nope")
    monkeypatch.delenv("MQTOOL_DATA", raising=False)
    assert zs.local_file("piqa") is None  # no data root: the hub
    assert zs.local_file("piqa", tmp_path) is None  # no zeroshot/ file there: the hub
    (data_root / "zeroshot" / "piqa_valid-labels.lst").write_text("0\n")
    with pytest.raises(MqtoolError, match="1 labels for 2 examples"):
        zs.hf_docs("piqa", zs.local_file("piqa", data_root))


def test_cli_errors_are_one_line(capsys, data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code, _, err = run_cli(capsys, "zeroshot", "demo", "--tasks", "piqa,nope", "--data-dir", str(data_root))
    assert code == 2 and err.startswith("error: unknown zero-shot task 'nope'") and err.count("\n") == 1
    # without lm-eval, the command says how to get it
    for mod in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")] or ["lm_eval"]:
        monkeypatch.setitem(sys.modules, mod, None)
    monkeypatch.delitem(sys.modules, "mqtool.evaluate.lm_eval_adapter", raising=False)
    code, _, err = run_cli(capsys, "zeroshot", "demo", "--tasks", "piqa", "--limit", "1", "--device", "cpu",
                           "--data-dir", str(data_root))
    assert code == 2 and "pip install mqtool[eval]" in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# With lm-eval


@pytest.fixture
def lm_eval_mod():
    return pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install mqtool[eval])")


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


def recording_lm(lm_eval_mod):
    """A MqtoolLM on the successor model that keeps each loglikelihood request lm-eval makes."""
    from mqtool.evaluate.lm_eval_adapter import MqtoolLM

    class Recording(MqtoolLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            for r in requests:
                self.seen.setdefault(r.task_name, {}).setdefault(r.doc_id, []).append((r.idx, tuple(r.arguments)))
            return super().loglikelihood(requests, disable_tqdm)

    lm = Recording(SuccessorLM(), CharTokenizer())
    lm.seen = {}
    return lm


def test_lm_eval_tasks_read_the_local_files(lm_eval_mod, data_root: Path) -> None:
    """lm-eval's own task definitions on the local files make the requests its tasks make on the
    hub's rows (EXPECTED), every document once; the metrics are lm-eval's, with their stderr."""
    lm = recording_lm(lm_eval_mod)
    results = zs.evaluate_tasks(lm, list(EXPECTED), data_root)
    for name, want in EXPECTED.items():
        docs = lm.seen[name]
        got = [tuple(args for _, args in sorted(docs[d])) for d in sorted(docs)]
        assert got == [tuple(ex[:-1]) for ex in want], name
        r = results[name]
        assert r.n == len(want) and r.source == str(data_root / "zeroshot" / zs.TASKS[name].file)
        assert set(r.metrics) == ({"acc", "perplexity"} if name == "lambada_openai" else
                                  {"acc"} if name == "winogrande" else {"acc", "acc_norm"})
    # lambada on the successor model: " signs" and " \n\nrecorder" are not successors: acc 0
    assert results["lambada_openai"].metrics["acc"] == 0.0
    assert results["piqa"].stderr["acc"] is not None


def test_limit_is_lm_eval_limit(lm_eval_mod, data_root: Path) -> None:
    lm = recording_lm(lm_eval_mod)
    res = zs.evaluate_tasks(lm, "piqa", data_root, limit=1)["piqa"]
    assert res.n == 1 and list(lm.seen["piqa"]) == [0]
    assert res.to_dict().keys() >= {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", "seconds"}


def test_known_model_metrics(lm_eval_mod, tmp_path: Path) -> None:
    """acc and acc_norm as lm-eval computes them, on a model whose log-likelihoods are known: each
    choice is " " + choice after "...Answer:", so ":" -> " " and " " -> its first letter are wrong,
    then every successor letter is right."""
    d = tmp_path / "zeroshot"
    d.mkdir()
    write_jsonl(d / "arc_easy.jsonl", [
        # " q" = 2 wrong; " bcdefg" = 2 wrong + 5 right: less in total, more per character (acc_norm)
        {"query": "Question: abc", "choices": ["q", "bcdefg"], "gold": 1},
        # " xy" = 2 wrong + 1 right: less than " q" in total and per character is more: acc right only
        {"query": "Question: abc", "choices": ["xy", "q"], "gold": 1},
        # " bcd" = 2 wrong + 2 right: acc_norm right only
        {"query": "Question: abc", "choices": ["bcd", "q"], "gold": 0},
    ])
    res = zs.evaluate_tasks(recording_lm(lm_eval_mod), "arc_easy", tmp_path)["arc_easy"]
    assert res.metrics == {"acc": pytest.approx(1 / 3), "acc_norm": pytest.approx(2 / 3)}
    assert res.stderr["acc"] == pytest.approx(1 / 3)  # sample std (n - 1) / sqrt(n) of [0, 1, 0]
    assert res.n == 3
    # the premises above: each longer choice loses in total and wins per character against " q"
    for right, chars in ((5, 6), (1, 2), (2, 3)):
        assert 2 * WRONG + right * RIGHT < 2 * WRONG < (2 * WRONG + right * RIGHT) / chars


@pytest.mark.slow
def test_no_local_file_is_lm_evals_hub_task(lm_eval_mod, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A task without a local file is lm-eval's own (the hub); offline, that is a one-line error."""
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # fail at once, not after retries
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MqtoolError, match=r"^winogrande: lm-eval could not read the hub .*allenai/winogrande") as err:
        zs.evaluate_tasks(recording_lm(lm_eval_mod), "winogrande", tmp_path, limit=1)
    assert "\n" not in str(err.value)


def test_mqtool_is_a_registered_lm_eval_model(lm_eval_mod, data_root: Path) -> None:
    """``import mqtool.evaluate`` registers "mqtool": simple_evaluate(model="mqtool", model_args=...)
    builds it from a checkpoint and gives what the command's path gives."""
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    import mqtool.evaluate  # noqa: F401
    from mqtool.checkpoint import load_model
    from mqtool.evaluate.lm_eval_adapter import MqtoolLM

    assert get_model("mqtool") is MqtoolLM
    folder = data_root / "tasks"
    folder.mkdir()
    zs.write_task_yaml("arc_easy", zs.local_file("arc_easy", data_root), folder)
    out = lm_eval.simple_evaluate(model="mqtool", model_args=f"pretrained={DEMO},device=cpu,batch_size=2",
                                  tasks=["arc_easy"], task_manager=TaskManager(include_path=str(folder),
                                                                               include_defaults=False))
    net, _ = load_model(DEMO)
    direct = zs.evaluate_tasks(MqtoolLM(net, load_tokenizer(DEMO)), "arc_easy", data_root)["arc_easy"]
    assert out["results"]["arc_easy"]["acc,none"] == direct.metrics["acc"]
    assert out["results"]["arc_easy"]["acc_norm,none"] == direct.metrics["acc_norm"]


def test_adapter_matches_the_scorer_batched_or_not(lm_eval_mod, config_factory, model_factory) -> None:
    """lm-eval's encoding of each request (trailing spaces to the continuation, an empty context as
    the end-of-text token) scored by loglikelihood_tokens; batch size 1 and 3 agree."""
    from lm_eval.api.instance import Instance

    from mqtool.evaluate.lm_eval_adapter import MqtoolLM

    tok = load_tokenizer(DEMO)
    model = model_factory(config_factory("mamba2", vocab_size=tok.vocab_size, d_model=32))
    reqs = [("Question: What is a pipe?\nAnswer:", " a file"), ("The kernel ", "module"), ("", " hello world"),
            ("A long context about memory pages and the scheduler.", " It")]
    insts = [Instance("loglikelihood", {}, r, i) for i, r in enumerate(reqs)]
    got = MqtoolLM(model, tok, batch_size=3).loglikelihood(insts)
    one = MqtoolLM(model, tok, batch_size=1).loglikelihood(insts)
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in one], abs=1e-5)
    pairs = [(tok.encode("Question: What is a pipe?\nAnswer:"), tok.encode(" a file")),
             (tok.encode("The kernel"), tok.encode("The kernel module")[len(tok.encode("The kernel")):]),
             ([tok.eos_id], tok.encode(" hello world")),
             (tok.encode(reqs[3][0]), tok.encode(reqs[3][0] + " It")[len(tok.encode(reqs[3][0])):])]
    want = loglikelihood_tokens(model, pairs)
    assert [g for _, g in got] == [g for _, g in want]
    assert [ll for ll, _ in got] == pytest.approx([ll for ll, _ in want], abs=1e-6)
    # rolling: the whole string after the end-of-text token, in one window or in several
    text = "The scheduler picks the next runnable task from its queue."
    ids = tok.encode(text)
    lm = MqtoolLM(model, tok)
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    assert rolling == pytest.approx(loglikelihood_tokens(model, [([tok.eos_id], ids)])[0][0], abs=1e-4)
    short = MqtoolLM(model, tok, max_length=4).loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
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
def test_cli_demo_two_tasks(lm_eval_mod, capsys, tmp_path: Path) -> None:
    out_json = tmp_path / "zs.json"
    code, out, err = run_cli(capsys, "zeroshot", "demo", "--tasks", "piqa,arc_easy", "--limit", "3", "--device",
                             "cpu", "--data-dir", str(shared_data()), "--json-out", str(out_json))
    assert code == 0, err
    assert "piqa" in out and "arc_easy" in out and "acc_norm" in out and "lm-eval" in out
    doc = json.loads(out_json.read_text())
    assert doc["model"] == "demo" and doc["limit"] == 3
    for name in ("piqa", "arc_easy"):
        r = doc["results"][name]
        assert r["n"] == 3 and r["source"].endswith(zs.TASKS[name].file)
        for m in ("acc", "acc_norm"):
            assert r[m] in (0.0, 1 / 3, 2 / 3, 1.0)
            assert r[f"{m}_stderr"] is not None
