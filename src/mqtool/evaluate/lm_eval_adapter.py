"""An lm-eval ``LM`` around an mqtool model, registered in lm-eval's model registry as "mqtool".

Importing ``mqtool.evaluate`` imports this module where lm-eval is installed, so
``lm_eval.simple_evaluate(model="mqtool", model_args="pretrained=DIR", tasks=[...])`` works from
Python; ``mqtool zeroshot`` hands lm-eval an instance around the model it has loaded. Only
lm-eval's public API is used: ``lm_eval.api.model.TemplateLM`` and
``lm_eval.api.registry.register_model`` here, ``simple_evaluate`` and ``TaskManager`` in
``zeroshot``.

lm-eval encodes the requests (``TemplateLM._encode_pair``); ``loglikelihood.loglikelihood_tokens``
scores the tokens, right-padded (never left-padded: padding in front of a Mamba input would flow
through the recurrent state). ``generate_until`` is greedy decoding with the recurrent state cache.

Importing this module raises ``MqtoolError`` (``pip install mqtool[eval]``) where lm-eval is
missing or does not import.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from mqtool.errors import MqtoolError
from mqtool.evaluate.loglikelihood import DEFAULT_BATCH, MAX_LENGTH, loglikelihood_tokens

INSTALL = "pip install mqtool[eval]"

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as _err:
    raise MqtoolError(f"zero-shot evaluation runs on lm-eval, which is not installed ({_err}): {INSTALL}") from _err
except Exception as _err:  # e.g. an lm-eval release that breaks with the installed datasets
    raise MqtoolError(f"lm-eval is installed but does not import ({type(_err).__name__}: {_err}); "
                      f"{INSTALL} in a fresh environment") from _err

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _load(pretrained: str | Path, dtype: str, device: str | None, data_dir: str | None):
    """(model, tokenizer, checkpoint) of a checkpoint directory, a hub id or ``demo``."""
    from mqtool.checkpoint import load_model
    from mqtool.data import load_tokenizer

    if dtype not in _DTYPES:
        raise MqtoolError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    spec = str(pretrained)
    if spec == "demo":
        spec = str(Path(__file__).resolve().parents[1] / "assets" / "demo-mamba2")
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model, ckpt = load_model(spec, dtype=_DTYPES[dtype], device=device)
    return model, load_tokenizer(ckpt.path, data_dir), ckpt


@register_model("mqtool")
class MqtoolLM(TemplateLM):
    """lm-eval's view of an mqtool model: ``loglikelihood`` (from TemplateLM, which encodes each
    pair as lm-eval does), ``loglikelihood_rolling`` and greedy ``generate_until``.

    Give either ``model`` and ``tokenizer`` (objects), or ``pretrained`` (what ``mqtool eval``
    takes: a checkpoint directory, hub id or ``demo``; lm-eval's ``model_args`` are these keyword
    arguments as strings). ``mode`` is the model's forward mode: ``auto`` is ``recurrent`` where the
    checkpoint quantizes the state cache. ``max_length`` cuts inputs from the left as lm-eval's
    Mamba wrapper does (2048)."""

    def __init__(self, model: torch.nn.Module | None = None, tokenizer=None, batch_size: int | str = DEFAULT_BATCH,
                 mode: str = "auto", max_length: int | str = MAX_LENGTH, max_gen_toks: int | str = 256, *,
                 pretrained: str | None = None, device: str | None = None, dtype: str = "float32",
                 data_dir: str | None = None, max_batch_size: int | None = None) -> None:
        super().__init__()
        online: dict = {}
        if pretrained is not None:
            if model is not None:
                raise MqtoolError("give the mqtool lm-eval model either pretrained= or a model, not both")
            model, tok, ckpt = _load(pretrained, dtype, device, data_dir)
            tokenizer = tokenizer or tok
            online = ckpt.manifest.online
        elif model is None or tokenizer is None:
            raise MqtoolError("the mqtool lm-eval model needs pretrained=DIR (or a model and a tokenizer)")
        if mode == "auto":
            mode = "recurrent" if online.get("state_quantizer") else "parallel"
        if mode not in ("parallel", "recurrent"):
            raise MqtoolError(f"mode must be parallel, recurrent or auto, got {mode!r}")
        # lm-eval's --batch_size may be "auto" or "auto:N"; a fixed size is what this model uses
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            batch_size = DEFAULT_BATCH
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        self.mode = mode
        self._max_length = int(max_length)
        self.max_gen_toks = int(max_gen_toks)
        if self.batch_size <= 0:
            raise MqtoolError(f"batch size must be positive, got {batch_size}")

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
        conditioned on the end-of-text token (lm-eval's rolling windows, context_len 1, as HFLM)."""
        # imported here: a utility, not the model API; the rest of the adapter does not need it
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

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
                raise MqtoolError("the mqtool lm-eval model generates greedily only (do_sample is set)")
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            ids = self.tok_encode(context)[-max(self.max_length - max_new, 1):] or [self.prefix_token_id]
            text = self._greedy(ids, max_new, until)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            outputs.append(text)
        return outputs
