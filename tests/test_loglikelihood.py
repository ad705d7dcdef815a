"""Log-likelihoods of token pairs: against a hand computation on one unpadded forward pass, and the
same whether the requests run one by one or batched (right-padded, never left-padded), in any order,
in parallel or recurrent mode."""

from __future__ import annotations

import random

import pytest
import torch

from mqtool.errors import MqtoolError
from mqtool.evaluate.loglikelihood import loglikelihood_tokens

pytestmark = pytest.mark.usefixtures("single_thread")  # conftest: one thread, restored after


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
    got = loglikelihood_tokens(model, pairs, batch_size=5)
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
    one = loglikelihood_tokens(model, pairs, batch_size=1)  # no padding at all
    for bs in (3, 11):
        many = loglikelihood_tokens(model, pairs, batch_size=bs)
        assert [g for _, g in many] == [g for _, g in one]
        assert [ll for ll, _ in many] == pytest.approx([ll for ll, _ in one], abs=1e-5)
    perm = list(range(len(pairs)))
    random.Random(2).shuffle(perm)
    shuffled = loglikelihood_tokens(model, [pairs[i] for i in perm], batch_size=4)
    assert shuffled == [loglikelihood_tokens(model, pairs, batch_size=4)[i] for i in perm]  # deterministic
    rec = loglikelihood_tokens(model, pairs, batch_size=4, mode="recurrent")
    assert [ll for ll, _ in rec] == pytest.approx([ll for ll, _ in one], abs=1e-4)


def test_inputs_cut_from_the_left_at_max_length(config_factory, model_factory) -> None:
    model = model_factory(config_factory("mamba2"))
    ctx, cont = list(range(1, 21)), [7, 8, 9]
    got = loglikelihood_tokens(model, [(ctx, cont)], max_length=10)[0]
    # lm-eval: (context + continuation)[-(max_length + 1):][:-1] is the input
    kept = (ctx + cont)[-11:]
    want = hand_loglikelihood(model, kept[:-3], cont)
    assert got[0] == pytest.approx(want[0], abs=1e-4)
    with pytest.raises(MqtoolError, match="longer than max_length"):
        loglikelihood_tokens(model, [(ctx, list(range(12)))], max_length=10)




def test_inputs_are_right_padded(config_factory, model_factory) -> None:
    """Each row of a batch starts with its own tokens: padding only ever follows them."""
    model = model_factory(config_factory("mamba1"))
    seen: list[torch.Tensor] = []
    forward = model.forward
    model.forward = lambda ids, **kw: (seen.append(ids.clone()), forward(ids, **kw))[1]
    pairs = [([5, 6, 7, 8, 9], [10]), ([3], [4, 2]), ([1, 2], [3])]
    loglikelihood_tokens(model, pairs, batch_size=3)
    (batch,) = seen
    inputs = sorted(((ctx + cont)[:-1] for ctx, cont in pairs), key=lambda x: (-len(x), x))
    assert batch.shape == (3, 5)
    for row, ids in zip(batch.tolist(), inputs, strict=True):
        assert row[: len(ids)] == ids and set(row[len(ids):]) <= {0}
