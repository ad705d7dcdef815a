"""Zero-shot tasks the Mamba, MambaQuant and Q-Mamba papers report, scored as lm-eval 0.4 scores
them, with no lm-eval needed.

Tasks (lm-eval's names): piqa, arc_easy, arc_challenge, openbookqa, hellaswag, winogrande (acc and,
except for winogrande, acc_norm) and lambada_openai (acc: the continuation is the greedy argmax at
every position; perplexity: exp of minus the mean per-example log-likelihood). Data come from local
files, ``<data root>/zeroshot/<file>`` (the root is ``--data-dir`` or ``$MQTOOL_DATA``, laid out like
shared/data); each loader turns its file into the Hugging Face schema the lm-eval task reads, and
each ``_build_*`` function is that task's lm-eval definition (doc_to_text, doc_to_choice,
doc_to_target, target delimiter " ").

Scoring follows lm-eval's ``TemplateLM`` and ``HFLM``: trailing spaces of the context move to the
continuation; the continuation's tokens are those of ``encode(context + continuation)`` after the
first ``len(encode(context))``; an empty context becomes the end-of-text token; the input is
``(context + continuation)[-(max_length + 1):][:-1]``; the score is the sum of the continuation
tokens' log-probabilities. Requests run longest first, right-padded (a causal model's logits at a
position do not depend on the tokens after it). acc_norm divides each choice's log-likelihood by the
choice's length in characters, ``len(choice)`` as lm-eval's code computes it (its docs say bytes;
the same for ASCII text). Log-probabilities are taken over the model's real vocabulary
(``config.vocab_size``), not its padding rows, which no token can be.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from mqtool.data import DATA_ENV, data_root, iter_json_lines
from mqtool.errors import MqtoolError

ZEROSHOT_DIR = "zeroshot"
MAX_LENGTH = 2048  # lm-eval's default context for Mamba models (models/mamba_lm.py)
DEFAULT_BATCH = 16


class TextTokenizer(Protocol):
    """What the scorer needs of a tokenizer (``mqtool.data.Tokenizer`` has it)."""

    def encode(self, text: str) -> list[int]: ...

    @property
    def eos_id(self) -> int | None: ...


@dataclass(frozen=True)
class Example:
    """One document as lm-eval's requests: a (context, continuation) pair per choice, the gold
    choice's index, and the choice strings whose lengths acc_norm divides by."""

    requests: tuple[tuple[str, str], ...]
    gold: int = 0
    choices: tuple[str, ...] = ()


@dataclass
class ZeroShotTask:
    """A task's examples and what to report: multiple_choice (acc[, acc_norm]) or loglikelihood
    (acc = greedy, perplexity)."""

    name: str
    kind: str
    metrics: tuple[str, ...]
    examples: list[Example] = field(default_factory=list)

    @property
    def n_requests(self) -> int:
        return sum(len(e.requests) for e in self.examples)


@dataclass
class TaskResult:
    task: str
    metrics: dict[str, float]
    stderr: dict[str, float | None]
    n: int
    requests: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# Reading the task files into the Hugging Face schemas lm-eval's tasks read


def _jsonl(path: Path, limit: int | None) -> list[dict]:
    rows: list[dict] = []
    try:
        for lineno, row in iter_json_lines(path):
            if limit is not None and len(rows) >= limit:
                break
            if not isinstance(row, dict):
                raise MqtoolError(f"{path}:{lineno}: expected a JSON object")
            rows.append(row)
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise MqtoolError(f"cannot read {path}: {err}") from err
    return rows


def _need(row: dict, keys: Sequence[str], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise MqtoolError(f"{where}: missing field(s) {', '.join(missing)} (has {', '.join(sorted(row))})")


def _load_piqa(folder: Path, limit: int | None) -> list[dict]:
    """piqa_valid.jsonl (goal, sol1, sol2) + piqa_valid-labels.lst (one 0/1 a line), the original
    release; rows that carry their own ``label`` need no labels file."""
    path = folder / "piqa_valid.jsonl"
    rows = _jsonl(path, limit)
    if rows and all("label" in r for r in rows):
        return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(r["label"])} for r in rows]
    labels_path = folder / "piqa_valid-labels.lst"
    try:
        labels = [s.strip() for s in labels_path.read_text(encoding="utf-8").splitlines() if s.strip()]
    except OSError as err:
        raise MqtoolError(f"piqa: cannot read the labels file {labels_path}: {err}") from err
    if len(labels) < len(rows):
        raise MqtoolError(f"piqa: {labels_path} has {len(labels)} labels for {len(rows)} examples")
    out = []
    for i, (r, lab) in enumerate(zip(rows, labels, strict=False)):
        _need(r, ("goal", "sol1", "sol2"), f"{path}:{i + 1}")
        if lab not in ("0", "1"):
            raise MqtoolError(f"{labels_path}:{i + 1}: label {lab!r} is not 0 or 1")
        out.append({"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(lab)})
    return out


_LETTERS = "ABCDEFGHIJ"


def _mc_rows(path: Path, limit: int | None, question_key: str, strip_prefix: str) -> list[dict]:
    """{query, choices, gold} rows (lm-eval's processed form) -> the HF schema (question,
    choices{text, label}, answerKey); rows already in the HF schema pass through."""
    out = []
    for i, r in enumerate(_jsonl(path, limit)):
        if question_key in r:
            _need(r, ("choices", "answerKey"), f"{path}:{i + 1}")
            out.append(r)
            continue
        _need(r, ("query", "choices", "gold"), f"{path}:{i + 1}")
        query = r["query"]
        # the processed ARC form is "Question: {q}" (some writers add "\nAnswer:"): keep {q}
        if strip_prefix and query.startswith(strip_prefix):
            query = query[len(strip_prefix):]
            if query.endswith("\nAnswer:"):
                query = query[: -len("\nAnswer:")]
        labels = list(_LETTERS[: len(r["choices"])])
        if not 0 <= int(r["gold"]) < len(labels):
            raise MqtoolError(f"{path}:{i + 1}: gold {r['gold']} out of range for {len(labels)} choices")
        out.append({question_key: query, "choices": {"text": list(r["choices"]), "label": labels},
                    "answerKey": labels[int(r["gold"])]})
    return out


def _load_arc(file: str) -> Callable[[Path, int | None], list[dict]]:
    return lambda folder, limit: _mc_rows(folder / file, limit, "question", "Question: ")


def _load_openbookqa(folder: Path, limit: int | None) -> list[dict]:
    return _mc_rows(folder / "openbook_qa.jsonl", limit, "question_stem", "")


def _load_lambada(folder: Path, limit: int | None) -> list[dict]:
    """{context, continuation} rows (the text split at its last space) -> {text}; {text} rows pass."""
    path = folder / "lambada_openai.jsonl"
    out = []
    for i, r in enumerate(_jsonl(path, limit)):
        if "text" in r:
            out.append({"text": r["text"]})
            continue
        _need(r, ("context", "continuation"), f"{path}:{i + 1}")
        if " " in r["continuation"]:
            raise MqtoolError(f"{path}:{i + 1}: the continuation has a space; lambada's target is the last word")
        out.append({"text": r["context"] + " " + r["continuation"]})
    return out


def _load_hf(file: str, keys: tuple[str, ...]) -> Callable[[Path, int | None], list[dict]]:
    def load(folder: Path, limit: int | None) -> list[dict]:
        rows = _jsonl(folder / file, limit)
        for i, r in enumerate(rows):
            _need(r, keys, f"{folder / file}:{i + 1}")
        return rows

    return load


# ----------------------------------------------------------------------------------------------
# lm-eval's task definitions (lm_eval/tasks/*/ in lm-eval 0.4), one function a task


def _mc(context: str, choices: Sequence[str], gold: int) -> Example:
    return Example(tuple((context, " " + c) for c in choices), gold, tuple(choices))


def _build_piqa(doc: dict) -> Example:
    return _mc(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"]))


def _build_arc(doc: dict) -> Example:
    choices = doc["choices"]
    return _mc(f"Question: {doc['question']}\nAnswer:", choices["text"], choices["label"].index(doc["answerKey"]))


def _build_openbookqa(doc: dict) -> Example:
    choices = doc["choices"]
    return _mc(doc["question_stem"], choices["text"], choices["label"].index(doc["answerKey"].lstrip()))


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag ``preprocess``: strip, " [title]" -> ". ", drop [bracketed] WikiHow
    artifacts, then one pass of double spaces -> single."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _build_hellaswag(doc: dict) -> Example:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    query = hellaswag_preprocess(doc["activity_label"] + ": " + ctx)
    return _mc(query, [hellaswag_preprocess(e) for e in doc["endings"]], int(doc["label"]))


def _build_winogrande(doc: dict) -> Example:
    """Partial scoring: each option substituted for the blank ends the context; the continuation
    is the rest of the sentence after the blank, the same for both options."""
    sentence = doc["sentence"]
    idx = sentence.index("_")
    target = sentence[idx + 1:].strip()
    contexts = [sentence[:idx] + doc["option1"], sentence[:idx] + doc["option2"]]
    return Example(tuple((c, " " + target) for c in contexts), {"1": 0, "2": 1}[doc["answer"]], tuple(contexts))


def _build_lambada(doc: dict) -> Example:
    words = doc["text"].split(" ")
    return Example(((" ".join(words[:-1]), " " + words[-1]),))


@dataclass(frozen=True)
class TaskSpec:
    name: str
    file: str  # under <data root>/zeroshot, for messages
    kind: str
    metrics: tuple[str, ...]
    load: Callable[[Path, int | None], list[dict]]
    build: Callable[[dict], Example]


_MC = ("acc", "acc_norm")
TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("piqa", "piqa_valid.jsonl", "multiple_choice", _MC, _load_piqa, _build_piqa),
        TaskSpec("arc_easy", "arc_easy.jsonl", "multiple_choice", _MC, _load_arc("arc_easy.jsonl"), _build_arc),
        TaskSpec("arc_challenge", "arc_challenge.jsonl", "multiple_choice", _MC, _load_arc("arc_challenge.jsonl"),
                 _build_arc),
        TaskSpec("openbookqa", "openbook_qa.jsonl", "multiple_choice", _MC, _load_openbookqa, _build_openbookqa),
        TaskSpec("hellaswag", "hellaswag_validation.jsonl", "multiple_choice", _MC,
                 _load_hf("hellaswag_validation.jsonl", ("activity_label", "ctx_a", "ctx_b", "endings", "label")),
                 _build_hellaswag),
        TaskSpec("winogrande", "winogrande_xl_validation.jsonl", "multiple_choice", ("acc",),
                 _load_hf("winogrande_xl_validation.jsonl", ("sentence", "option1", "option2", "answer")),
                 _build_winogrande),
        TaskSpec("lambada_openai", "lambada_openai.jsonl", "loglikelihood", ("acc", "perplexity"), _load_lambada,
                 _build_lambada),
    )
}
ALIASES = {"openbook_qa": "openbookqa", "lambada": "lambada_openai", "winogrande_xl": "winogrande",
           "arc_e": "arc_easy", "arc_c": "arc_challenge"}


def parse_tasks(tasks: str | Sequence[str]) -> list[str]:
    """Comma-separated (or listed) task names -> canonical lm-eval names, in order, no repeats."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if not names:
        raise MqtoolError("no zero-shot task given")
    out: list[str] = []
    for n in names:
        canon = ALIASES.get(n.lower(), n.lower())
        if canon not in TASKS:
            raise MqtoolError(f"unknown zero-shot task '{n}' (tasks: {', '.join(TASKS)})")
        if canon not in out:
            out.append(canon)
    return out


def zeroshot_dir(data_dir: str | Path | None = None) -> Path:
    """``<data root>/zeroshot``, or an error saying where it was looked for."""
    root = data_root(data_dir)
    if root is None:
        raise MqtoolError(f"zero-shot tasks are read from local files: set --data-dir or {DATA_ENV} to a folder "
                          f"laid out like shared/data (with {ZEROSHOT_DIR}/)")
    folder = root / ZEROSHOT_DIR
    if not folder.is_dir():
        raise MqtoolError(f"no {ZEROSHOT_DIR}/ folder in the data root {root}")
    return folder


def load_docs(name: str, data_dir: str | Path | None = None, limit: int | None = None) -> list[dict]:
    """The first ``limit`` documents of a task, in the Hugging Face schema its lm-eval task reads."""
    spec = TASKS[parse_tasks(name)[0]]
    if limit is not None and limit <= 0:
        raise MqtoolError(f"limit must be positive, got {limit}")
    folder = zeroshot_dir(data_dir)
    if not (folder / spec.file).is_file():
        raise MqtoolError(f"{spec.name}: no task file {folder / spec.file}")
    docs = spec.load(folder, limit)
    if not docs:
        raise MqtoolError(f"{spec.name}: {folder / spec.file} has no examples")
    return docs


def load_task(name: str, data_dir: str | Path | None = None, limit: int | None = None) -> ZeroShotTask:
    """A task's first ``limit`` examples (all without a limit) as requests."""
    spec = TASKS[parse_tasks(name)[0]]
    examples = []
    for i, doc in enumerate(load_docs(spec.name, data_dir, limit)):
        try:
            examples.append(spec.build(doc))
        except (KeyError, ValueError, TypeError, AttributeError) as err:
            raise MqtoolError(f"{spec.name}: example {i} does not fit the task ({type(err).__name__}: {err})") from err
    return ZeroShotTask(spec.name, spec.kind, spec.metrics, examples)


# ----------------------------------------------------------------------------------------------
# Log-likelihoods


def encode_pair(tokenizer: TextTokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a request into tokens: the context's trailing spaces move to the
    continuation, the continuation is ``encode(context + continuation)[len(encode(context)):]``;
    an empty context is the end-of-text token."""
    if context == "":
        if tokenizer.eos_id is None:
            raise MqtoolError("an empty context needs an end-of-text token, and the tokenizer has none")
        return [tokenizer.eos_id], tokenizer.encode(continuation)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx):]


@torch.inference_mode()
def loglikelihood_tokens(
    model: torch.nn.Module,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = DEFAULT_BATCH,
    mode: str = "parallel",
    max_length: int = MAX_LENGTH,
    on_batch: Callable[[int], None] | None = None,
) -> list[tuple[float, bool]]:
    """(context ids, continuation ids) pairs -> (summed log-probability of the continuation,
    whether it is the greedy argmax at every position), in the order given.

    ``model(ids [b, l], mode=mode)`` returns logits [b, l, vocab]. Inputs are cut to ``max_length``
    from the left, as lm-eval does; they run longest first, ``batch_size`` at a time, right-padded.
    ``on_batch(k)`` is called after each batch with the number of pairs it held."""
    if batch_size <= 0:
        raise MqtoolError(f"batch size must be positive, got {batch_size}")
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    inputs: list[list[int]] = []
    conts: list[list[int]] = []
    for ctx, cont in pairs:
        cont = list(cont)
        if not ctx:
            raise MqtoolError("a request has no context tokens (an empty context is the end-of-text token)")
        if not cont:
            raise MqtoolError("a request has an empty continuation")
        if len(cont) > max_length:
            raise MqtoolError(f"a continuation of {len(cont)} tokens is longer than max_length {max_length}")
        inputs.append((list(ctx) + cont)[-(max_length + 1):][:-1])
        conts.append(cont)
    # longest first, ties by content: deterministic, and equal requests sit side by side
    order = sorted(range(len(inputs)), key=lambda i: (-len(inputs[i]), inputs[i] + conts[i]))
    results: list[tuple[float, bool]] = [(0.0, False)] * len(inputs)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        width = len(inputs[idx[0]])
        batch = torch.zeros(len(idx), width, dtype=torch.long)
        for r, i in enumerate(idx):
            batch[r, : len(inputs[i])] = torch.tensor(inputs[i], dtype=torch.long)
        logits = model(batch.to(device), mode=mode)
        for r, i in enumerate(idx):
            n, c = len(inputs[i]), len(conts[i])
            logprobs = logits[r, n - c:n, :vocab].float().log_softmax(-1)
            target = torch.tensor(conts[i], dtype=torch.long, device=logprobs.device)
            ll = logprobs.gather(-1, target[:, None]).double().sum().item()
            greedy = bool((logprobs.argmax(-1) == target).all())
            results[i] = (ll, greedy)
        if on_batch is not None:
            on_batch(len(idx))
    return results


# ----------------------------------------------------------------------------------------------
# Metrics


def _argmax(values: Sequence[float]) -> int:
    """First index of the largest value (numpy's argmax, which lm-eval uses)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def _mean_stderr(xs: Sequence[float]) -> float | None:
    """lm-eval's ``mean_stderr``: sample standard deviation (n - 1) over sqrt(n)."""
    n = len(xs)
    if n < 2:
        return None
    mu = sum(xs) / n
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (n - 1) / n)


def aggregate(task: ZeroShotTask, scores: Sequence[tuple[float, bool]]) -> tuple[dict, dict]:
    """Per-request (log-likelihood, greedy) in the task's request order -> (metrics, stderr)."""
    per: dict[str, list[float]] = {m: [] for m in task.metrics}
    lls: list[float] = []
    pos = 0
    for ex in task.examples:
        s = scores[pos:pos + len(ex.requests)]
        pos += len(ex.requests)
        if task.kind == "loglikelihood":
            lls.append(s[0][0])
            per["acc"].append(float(s[0][1]))
            continue
        ll = [x[0] for x in s]
        per["acc"].append(float(_argmax(ll) == ex.gold))
        if "acc_norm" in per:
            # len(choice) in characters, as lm-eval; an empty choice would divide by zero there too
            norm = [v / len(c) if len(c) else -math.inf for v, c in zip(ll, ex.choices, strict=True)]
            per["acc_norm"].append(float(_argmax(norm) == ex.gold))
    metrics: dict[str, float] = {}
    stderr: dict[str, float | None] = {}
    for m in task.metrics:
        if m == "perplexity":
            metrics[m] = math.exp(-sum(lls) / len(lls))
            stderr[m] = None  # lm-eval bootstraps this one
        else:
            metrics[m] = sum(per[m]) / len(per[m])
            stderr[m] = _mean_stderr(per[m])
    return metrics, stderr


def evaluate(
    model: torch.nn.Module,
    tokenizer: TextTokenizer,
    task: ZeroShotTask,
    batch_size: int = DEFAULT_BATCH,
    mode: str = "parallel",
    max_length: int = MAX_LENGTH,
    on_batch: Callable[[int], None] | None = None,
) -> TaskResult:
    """Score every request of ``task`` and aggregate lm-eval's metrics for it."""
    if not task.examples:
        raise MqtoolError(f"{task.name}: no examples")
    start = time.perf_counter()
    pairs = [encode_pair(tokenizer, c, x) for ex in task.examples for c, x in ex.requests]
    scores = loglikelihood_tokens(model, pairs, batch_size, mode, max_length, on_batch)
    metrics, stderr = aggregate(task, scores)
    return TaskResult(task.name, metrics, stderr, len(task.examples), len(pairs), time.perf_counter() - start)
