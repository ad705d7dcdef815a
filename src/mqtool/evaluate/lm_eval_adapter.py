"""An lm-eval 0.4 ``LM`` around an mqtool model and tokenizer, and zero-shot evaluation through
lm-eval's own task definitions on the local task files.

Import this module only when lm-eval is wanted: it imports lm-eval at once and raises
``MqtoolError`` (``pip install mqtool[eval]``) where lm-eval is missing or does not import.

``MqtoolLM`` is a ``TemplateLM`` (an ``lm_eval.api.model.LM``): lm-eval encodes the requests
(``_encode_pair``), mqtool scores the tokens with ``zeroshot.loglikelihood_tokens``, so lm-eval's
tasks and the built-in scorer share the same arithmetic. ``generate_until`` is greedy decoding
with the recurrent state cache.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from mqtool.errors import MqtoolError
from mqtool.evaluate.zeroshot import (
    DEFAULT_BATCH,
    MAX_LENGTH,
    TASKS,
    TaskResult,
    TextTokenizer,
    _mean_stderr,
    load_docs,
    loglikelihood_tokens,
    parse_tasks,
)

_INSTALL = "pip install mqtool[eval]"

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as _err:
    raise MqtoolError(f"the lm-eval backend needs lm-eval 0.4 ({_err}): {_INSTALL}") from _err
except Exception as _err:  # e.g. an lm-eval release that breaks with the installed transformers
    raise MqtoolError(f"lm-eval is installed but does not import ({type(_err).__name__}: {_err}); "
                      f"{_INSTALL} in a fresh environment, or use the built-in scorer") from _err


class MqtoolLM(TemplateLM):
    """lm-eval's view of an mqtool model: ``loglikelihood`` (from TemplateLM, which encodes each
    pair as lm-eval does), ``loglikelihood_rolling`` and greedy ``generate_until``.

    ``mode`` is the model's forward mode (``recurrent`` where the checkpoint quantizes the state
    cache); ``max_length`` cuts inputs from the left as lm-eval's Mamba wrapper does (2048)."""

    def __init__(self, model: torch.nn.Module, tokenizer: TextTokenizer, batch_size: int = DEFAULT_BATCH,
                 mode: str = "parallel", max_length: int = MAX_LENGTH, max_gen_toks: int = 256) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.mode = mode
        self._max_length = int(max_length)
        self.max_gen_toks = int(max_gen_toks)

    # ------------------------------------------------------------------ what TemplateLM asks for

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_id
        if eos is None:
            raise MqtoolError("the tokenizer has no end-of-text token, which lm-eval uses as a prefix")
        return eos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "path", type(self.tokenizer).__name__))

    def tok_encode(self, string: str, **kwargs) -> list[int]:
        return list(self.tokenizer.encode(string))

    def tok_decode(self, tokens: Sequence[int], **kwargs) -> str:
        return self.tokenizer.decode(list(tokens))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: ((context, continuation) or None, context ids, continuation ids)."""
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        results = loglikelihood_tokens(self.model, pairs, self.batch_size, self.mode, self.max_length)
        for (key, _, _), res in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    # ------------------------------------------------------------------ the rest of LM

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-string log-likelihood in disjoint windows of ``max_length`` tokens, the first one
        conditioned on the end-of-text token (lm-eval's rolling windows, context_len 1)."""
        pairs: list[tuple[list[int], list[int]]] = []
        owner: list[int] = []
        strings = [req.args[0] for req in requests]
        for k, string in enumerate(strings):
            windows = get_rolling_token_windows(token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                                                max_seq_len=self.max_length, context_len=1)
            for ctx, cont in map(make_disjoint_window, windows):
                pairs.append((list(ctx), list(cont)))
                owner.append(k)
        sums = [0.0] * len(strings)
        scores = loglikelihood_tokens(self.model, pairs, self.batch_size, self.mode, self.max_length) if pairs else []
        for k, (ll, _) in zip(owner, scores, strict=True):
            sums[k] += ll
        for string, total in zip(strings, sums, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return sums

    @torch.inference_mode()
    def _greedy(self, ids: list[int], max_new: int, until: list[str]) -> str:
        vocab = self.model.config.vocab_size
        cache = self.model.allocate_cache(1)
        x = torch.tensor([ids], dtype=torch.long, device=self.device)
        logits = self.model(x, mode=self.mode, cache=cache)[:, -1]
        out: list[int] = []
        for _ in range(max_new):
            nxt = int(logits[0, :vocab].argmax())
            if nxt == self.tokenizer.eos_id:
                break
            out.append(nxt)
            if until and any(s in self.tok_decode(out) for s in until):
                break
            logits = self.model.step(torch.tensor([nxt], device=self.device), cache)
        text = self.tok_decode(out)
        for s in until:
            text = text.split(s)[0]
        return text

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuation of each context until a stop string, end of text or
        ``max_gen_toks`` tokens; the text is cut before the first stop string."""
        outputs = []
        for req in requests:
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs or {})
            if kwargs.get("do_sample"):
                raise MqtoolError("the mqtool lm-eval adapter generates greedily only (do_sample is set)")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = self.tok_encode(context)[-max(self.max_length - max_new, 1):] or [self.prefix_token_id]
            text = self._greedy(ids, max_new, until)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            outputs.append(text)
        return outputs


# ----------------------------------------------------------------------------------------------
# lm-eval's task definitions on the local task files

# where each task's YAML sits in lm-eval 0.4's package (found through TaskManager otherwise)
_YAML = {"piqa": "piqa/piqa.yaml", "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
         "openbookqa": "openbookqa/openbookqa.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
         "winogrande": "winogrande/default.yaml", "lambada_openai": "lambada/lambada_openai.yaml"}


def _task_yaml(name: str) -> Path:
    import lm_eval.tasks

    path = Path(lm_eval.tasks.__file__).parent / _YAML[name]
    if path.is_file():
        return path
    entry = lm_eval.tasks.TaskManager().task_index.get(name)  # slow: indexes every task
    if not entry or not entry.get("yaml_path"):
        raise MqtoolError(f"lm-eval has no task '{name}'")
    return Path(entry["yaml_path"])


def lm_eval_task(name: str, docs: list[dict]):
    """lm-eval's ConfigurableTask ``name`` (its own YAML: prompts, choices, metrics) reading
    ``docs`` (the HF schema, as ``zeroshot.load_docs`` gives) instead of the hub."""
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.utils import load_yaml_config

    config = load_yaml_config(str(_task_yaml(name)))
    split = config.get("test_split") or config.get("validation_split")
    data = datasets.DatasetDict({split: datasets.Dataset.from_list(docs)})
    config.update(custom_dataset=lambda **_: data, training_split=None, fewshot_split=None,
                  validation_split=None if split != config.get("validation_split") else split)
    log = logging.getLogger("lm_eval")
    level = log.level
    log.setLevel(logging.ERROR)  # its warning about custom datasets' kwargs means nothing here
    try:
        return ConfigurableTask(config=config)
    finally:
        log.setLevel(level)


def evaluate_tasks(model: torch.nn.Module, tokenizer: TextTokenizer, tasks: str | Sequence[str],
                   data_dir: str | Path | None = None, limit: int | None = None, batch_size: int = DEFAULT_BATCH,
                   mode: str = "parallel", max_length: int = MAX_LENGTH) -> dict[str, TaskResult]:
    """Zero-shot metrics from ``lm_eval.simple_evaluate`` with lm-eval's task definitions on the
    local files (the first ``limit`` examples), one task at a time."""
    import lm_eval

    lm = MqtoolLM(model, tokenizer, batch_size=batch_size, mode=mode, max_length=max_length)
    results: dict[str, TaskResult] = {}
    for name in parse_tasks(tasks):
        docs = load_docs(name, data_dir, limit)
        start = time.perf_counter()
        out = lm_eval.simple_evaluate(model=lm, tasks=[lm_eval_task(name, docs)], num_fewshot=0,
                                      bootstrap_iters=0, log_samples=True, verbosity="ERROR")
        if out is None:
            raise MqtoolError("lm-eval returned no results")
        res, samples = out["results"][name], out["samples"][name]
        metrics = {m: float(res[f"{m},none"]) for m in TASKS[name].metrics}
        stderr = {m: None if m == "perplexity" else _mean_stderr([float(s[m]) for s in samples])
                  for m in TASKS[name].metrics}
        n_req = sum(len(TASKS[name].build(d).requests) for d in docs)
        results[name] = TaskResult(name, metrics, stderr, len(samples), n_req, time.perf_counter() - start)
    return results
