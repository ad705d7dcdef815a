"""Log-likelihoods of (context, continuation) token pairs on an mqtool model, as lm-eval's
``HFLM`` computes them: the input is ``(context + continuation)[-(max_length + 1):][:-1]``, the score
the sum of the continuation tokens' log-probabilities, and whether each continuation token is the
greedy argmax. Log-probabilities are over the model's real vocabulary (``config.vocab_size``), not
its padding rows, which no token can be.

Requests run longest first and are right-padded, never left-padded: a causal model's logits at a
position do not depend on the tokens after it, while padding in front of a Mamba input would run
through the recurrent state and change every score after it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mqtool.errors import MqtoolError

MAX_LENGTH = 2048  # lm-eval's default context for Mamba models (models/mamba_lm.py)
DEFAULT_BATCH = 16


@torch.inference_mode()
def loglikelihood_tokens(
    model: torch.nn.Module,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = DEFAULT_BATCH,
    mode: str = "parallel",
    max_length: int = MAX_LENGTH,
) -> list[tuple[float, bool]]:
    """(context ids, continuation ids) pairs -> (summed log-probability of the continuation,
    whether it is the greedy argmax at every position), in the order given.

    ``model(ids [b, l], mode=mode)`` returns logits [b, l, vocab]. Inputs are cut to ``max_length``
    from the left, as lm-eval does; they run longest first, ``batch_size`` at a time, right-padded."""
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
    return results
