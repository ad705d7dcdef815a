"""Zero-shot tasks the Mamba, MambaQuant and Q-Mamba papers report, scored by lm-eval itself:
``lm_eval.simple_evaluate`` with lm-eval's own task definitions and metrics.

Tasks (lm-eval's names): piqa, arc_easy, arc_challenge, openbookqa, hellaswag, winogrande and
lambada_openai. Where ``<data root>/zeroshot/<file>`` exists (the root is ``--data-dir`` or
``$MQTOOL_DATA``, laid out like shared/data), the task reads that file: a task YAML in a temporary
folder handed to ``TaskManager(include_path=...)`` includes lm-eval's YAML for the task and changes
only where the data come from (``dataset_path: json`` with ``data_files``). Files not already in the
Hugging Face schema the task reads (PIQA's labels file, the {query, choices, gold} and
{context, continuation} forms) are first written as HF-schema JSONL in that folder. A task with no
local file is lm-eval's own, read from the hub.

Nothing here imports lm-eval at module level: task names and the data conversion work without it.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from mqtool.data import data_root, iter_json_lines
from mqtool.errors import MqtoolError

ZEROSHOT_DIR = "zeroshot"


# ----------------------------------------------------------------------------------------------
# Reading the task files into the Hugging Face schemas lm-eval's tasks read


def _jsonl(path: Path) -> list[dict]:
    rows: list[dict] = []
    try:
        for lineno, row in iter_json_lines(path):
            if not isinstance(row, dict):
                raise MqtoolError(f"{path}:{lineno}: expected a JSON object")
            rows.append(row)
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise MqtoolError(f"cannot read {path}: {err}") from err
    if not rows:
        raise MqtoolError(f"{path} has no examples")
    return rows


def _need(row: dict, keys: Sequence[str], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise MqtoolError(f"{where}: missing field(s) {', '.join(missing)} (has {', '.join(sorted(row))})")


def _piqa(path: Path) -> list[dict]:
    """piqa_valid.jsonl (goal, sol1, sol2) + piqa_valid-labels.lst beside it (one 0/1 a line),
    the original release; rows that carry their own ``label`` need no labels file."""
    rows = _jsonl(path)
    if all("label" in r for r in rows):
        return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(r["label"])} for r in rows]
    labels_path = path.with_name(path.stem + "-labels.lst")
    try:
        labels = [s.strip() for s in labels_path.read_text(encoding="utf-8").splitlines() if s.strip()]
    except OSError as err:
        raise MqtoolError(f"piqa: cannot read the labels file {labels_path}: {err}") from err
    if len(labels) != len(rows):
        raise MqtoolError(f"piqa: {labels_path} has {len(labels)} labels for {len(rows)} examples")
    out = []
    for i, (r, lab) in enumerate(zip(rows, labels, strict=True)):
        _need(r, ("goal", "sol1", "sol2"), f"{path}:{i + 1}")
        if lab not in ("0", "1"):
            raise MqtoolError(f"{labels_path}:{i + 1}: label {lab!r} is not 0 or 1")
        out.append({"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(lab)})
    return out


_LETTERS = "ABCDEFGHIJ"


def _multiple_choice(question_key: str, strip_prefix: str) -> Callable[[Path], list[dict]]:
    """{query, choices, gold} rows (lm-eval's processed form) -> the HF schema (question_key,
    choices{text, label}, answerKey); rows already in the HF schema pass through."""

    def convert(path: Path) -> list[dict]:
        out = []
        for i, r in enumerate(_jsonl(path)):
            if question_key in r:
                _need(r, ("choices", "answerKey"), f"{path}:{i + 1}")
                out.append(r)
                continue
            _need(r, ("query", "choices", "gold"), f"{path}:{i + 1}")
            query = r["query"]
            # the processed ARC form is "Question: {q}" (some writers add "\nAnswer:"): keep {q}
            if strip_prefix and query.startswith(strip_prefix):
                query = query[len(strip_prefix):].removesuffix("\nAnswer:")
            labels = list(_LETTERS[: len(r["choices"])])
            if not 0 <= int(r["gold"]) < len(labels):
                raise MqtoolError(f"{path}:{i + 1}: gold {r['gold']} out of range for {len(labels)} choices")
            out.append({question_key: query, "choices": {"text": list(r["choices"]), "label": labels},
                        "answerKey": labels[int(r["gold"])]})
        return out

    return convert


def _lambada(path: Path) -> list[dict]:
    """{context, continuation} rows (the text split at its last space) -> {text}; {text} rows pass."""
    out = []
    for i, r in enumerate(_jsonl(path)):
        if "text" in r:
            out.append({"text": r["text"]})
            continue
        _need(r, ("context", "continuation"), f"{path}:{i + 1}")
        if " " in r["continuation"]:
            raise MqtoolError(f"{path}:{i + 1}: the continuation has a space; lambada's target is the last word")
        out.append({"text": r["context"] + " " + r["continuation"]})
    return out


@dataclass(frozen=True)
class TaskSpec:
    name: str  # lm-eval's task name
    file: str  # under <data root>/zeroshot
    split: str  # the split lm-eval evaluates (its YAML's test_split, else validation_split)
    yaml: str  # lm-eval's YAML for the task, under lm_eval/tasks/
    convert: Callable[[Path], list[dict]] | None  # to the HF schema; None: the file already is


TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("piqa", "piqa_valid.jsonl", "validation", "piqa/piqa.yaml", _piqa),
        TaskSpec("arc_easy", "arc_easy.jsonl", "test", "arc/arc_easy.yaml", _multiple_choice("question", "Question: ")),
        TaskSpec("arc_challenge", "arc_challenge.jsonl", "test", "arc/arc_challenge.yaml",
                 _multiple_choice("question", "Question: ")),
        TaskSpec("openbookqa", "openbook_qa.jsonl", "test", "openbookqa/openbookqa.yaml",
                 _multiple_choice("question_stem", "")),
        TaskSpec("hellaswag", "hellaswag_validation.jsonl", "validation", "hellaswag/hellaswag.yaml", None),
        TaskSpec("winogrande", "winogrande_xl_validation.jsonl", "validation", "winogrande/default.yaml", None),
        TaskSpec("lambada_openai", "lambada_openai.jsonl", "test", "lambada/lambada_openai.yaml", _lambada),
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


def local_file(name: str, data_dir: str | Path | None = None) -> Path | None:
    """``<data root>/zeroshot/<file>`` of a task where it exists, else None (the task reads the hub)."""
    root = data_root(data_dir)
    if root is None:
        return None
    path = root / ZEROSHOT_DIR / TASKS[name].file
    return path if path.is_file() else None


def hf_docs(name: str, path: Path) -> list[dict]:
    """A local task file's documents in the Hugging Face schema its lm-eval task reads."""
    spec = TASKS[name]
    return spec.convert(path) if spec.convert is not None else _jsonl(path)


# ----------------------------------------------------------------------------------------------
# lm-eval's tasks on the local files


def _lm_eval_yaml(name: str) -> Path:
    import lm_eval.tasks

    path = Path(lm_eval.tasks.__file__).parent / TASKS[name].yaml
    if not path.is_file():
        raise MqtoolError(f"this lm-eval has no {TASKS[name].yaml} for the task {name} (tested: lm-eval 0.4.13)")
    return path


def write_task_yaml(name: str, path: Path, folder: Path) -> Path:
    """A task YAML in ``folder`` that is lm-eval's ``name`` reading the local file ``path``
    (as HF-schema JSONL written beside it where the file is in another form)."""
    spec = TASKS[name]
    data = path.resolve()
    if spec.convert is not None:
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in hf_docs(name, path)),
                        encoding="utf-8")
    config = {
        "include": str(_lm_eval_yaml(name)),
        "task": name,
        "dataset_path": "json",
        "dataset_name": None,
        # the datasets cache of these files lives and goes with the folder
        "dataset_kwargs": {"data_files": {spec.split: str(data)}, "cache_dir": str(folder / "hf-cache")},
        "training_split": None,
        "validation_split": spec.split if spec.split == "validation" else None,
        "test_split": spec.split if spec.split == "test" else None,
    }
    out = folder / f"{name}.yaml"
    out.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return out


@dataclass
class TaskResult:
    """One task's lm-eval metrics and their standard errors (None where lm-eval gives none)."""

    task: str
    metrics: dict[str, float]
    stderr: dict[str, float | None]
    n: int
    source: str  # the local file, or "hub"
    seconds: float

    def to_dict(self) -> dict:
        """Flat, as a perplexity result: metric, metric_stderr, ..., n, source, seconds."""
        out: dict = {}
        for m, v in self.metrics.items():
            out[m] = v
            out[f"{m}_stderr"] = self.stderr.get(m)
        return out | {"n": self.n, "source": self.source, "seconds": self.seconds}


def _number(value) -> float | None:
    """lm-eval writes "N/A" for a standard error it did not compute."""
    return float(value) if isinstance(value, int | float) else None


def _result(name: str, out: dict, source: str, seconds: float) -> TaskResult:
    res = out["results"][name]
    metrics: dict[str, float] = {}
    stderr: dict[str, float | None] = {}
    for key, value in res.items():
        metric, _, filt = key.partition(",")
        if filt != "none" or metric.endswith("_stderr") or _number(value) is None:
            continue
        metrics[metric] = float(value)
        stderr[metric] = _number(res.get(f"{metric}_stderr,{filt}"))
    n = out.get("n-samples", {}).get(name, {}).get("effective")
    return TaskResult(name, metrics, stderr, int(n) if n is not None else -1, source, seconds)


def evaluate_tasks(lm, tasks: str | Sequence[str], data_dir: str | Path | None = None, limit: int | None = None,
                   bootstrap_iters: int = 1000) -> dict[str, TaskResult]:
    """``lm_eval.simple_evaluate`` of the lm-eval model ``lm`` on each task, zero-shot, on the first
    ``limit`` documents (lm-eval's ``limit``): the local file where there is one, else the hub.
    ``bootstrap_iters`` is lm-eval's, for the standard errors that it bootstraps (perplexity)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    names = parse_tasks(tasks)
    if limit is not None and limit <= 0:
        raise MqtoolError(f"limit must be positive, got {limit}")
    results: dict[str, TaskResult] = {}
    with tempfile.TemporaryDirectory(prefix="mqtool-zeroshot-") as tmp:
        folder = Path(tmp)
        sources = {}
        for name in names:
            path = local_file(name, data_dir)
            sources[name] = str(path) if path is not None else "hub"
            if path is not None:
                write_task_yaml(name, path, folder)
        # lm-eval's own task index only where a task reads the hub (indexing it takes a while)
        manager = TaskManager(include_path=str(folder), include_defaults="hub" in sources.values())
        for name in names:
            start = time.perf_counter()
            try:
                out = lm_eval.simple_evaluate(model=lm, tasks=[name], num_fewshot=0, limit=limit,
                                              task_manager=manager, bootstrap_iters=bootstrap_iters,
                                              log_samples=False)
            except (OSError, ConnectionError, ValueError) as err:  # datasets' errors: no file, no network
                where = "the hub (no local file under <data root>/zeroshot)" if sources[name] == "hub" \
                    else sources[name]
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                raise MqtoolError(f"{name}: lm-eval could not read {where}: {type(err).__name__}: {first}") from err
            if out is None:
                raise MqtoolError("lm-eval returned no results")
            results[name] = _result(name, out, sources[name], time.perf_counter() - start)
    return results
