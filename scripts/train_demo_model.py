#!/usr/bin/env python
"""Train the small Mamba-2 shipped as mqtool's offline demo model (`src/mqtool/assets/`).

It trains, on CPU and seeded:

1. a byte-level BPE tokenizer (GPT-NeoX-style: NFC, ByteLevel pre-tokenizer and decoder,
   "<|endoftext|>" as id 0) on the first few MB of the `techdocs` train text;
2. a small Mamba-2 language model with AdamW on random windows of the `techdocs` train text,
   tokenized with it;

then writes, under --out (default: src/mqtool/assets):

* `demo-mamba2/`: a checkpoint (config.json, model.safetensors in float16 like the state-spaces
  checkpoints, tokenizer.json, mqtool.json with the training parameters as its stage record);
* `demo-eval.txt`: held-out evaluation text, the start of `techdocs-test` (git manuals and Linux
  man-pages, not in the training text), cut at a blank line.

It prints the final training loss and the perplexity on demo-eval.txt (non-overlapping windows of
--seqlen tokens, mean NLL over the predicted tokens) of the checkpoint as saved (float16 weights,
upcast on load). The defaults reproduce the shipped asset:

    MQTOOL_DATA=/work/shared/data python scripts/train_demo_model.py

(bit-exact weights need the same torch build and 2 threads; the manifest's stage time differs).
"""

from __future__ import annotations

import os

# OpenMP threads that sleep rather than spin while waiting: on a CPU shared with other jobs,
# spinning threads make each step several times slower. Read when torch loads, so set first.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import tokenizers  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

from mqtool.checkpoint import Manifest, load_model, model_state_dict, record_stage, save_checkpoint  # noqa: E402
from mqtool.data import Tokenizer, eval_windows, load_text  # noqa: E402
from mqtool.errors import MqtoolError  # noqa: E402
from mqtool.models import MambaConfig, MambaLMHeadModel  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "src" / "mqtool" / "assets"
MODEL_DIR = "demo-mamba2"
EVAL_FILE = "demo-eval.txt"
EOT = "<|endoftext|>"
THREADS = 2
BETAS = (0.9, 0.95)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=None,
                   help="data root laid out like shared/data (default: $MQTOOL_DATA)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help=f"where {MODEL_DIR}/ and {EVAL_FILE} are written (replaced if present)")
    p.add_argument("--steps", type=int, default=800, help="optimizer steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256, help="training and evaluation window length")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (linear warmup, cosine decay)")
    p.add_argument("--warmup", type=int, default=50, help="warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--vocab-size", type=int, default=2048,
                   help="tokenizer vocabulary, <|endoftext|> included")
    p.add_argument("--tokenizer-chars", type=int, default=4_000_000,
                   help="leading characters of techdocs train the tokenizer learns from")
    p.add_argument("--train-chars", type=int, default=12_000_000,
                   help="leading characters of techdocs train the model's windows are drawn from")
    p.add_argument("--eval-chars", type=int, default=32_768,
                   help="demo-eval.txt: at most this many leading characters of techdocs-test, "
                        "cut at a blank line")
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--d-state", type=int, default=32)
    p.add_argument("--headdim", type=int, default=32)
    return p.parse_args(argv)


def train_tokenizer(text: str, vocab_size: int, path: Path) -> Tokenizer:
    """Byte-level BPE laid out like GPT-NeoX-20B's tokenizer.json."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # documents are separated by blank lines; feeding them one by one keeps memory flat
    tok.train_from_iterator((doc for doc in text.split("\n\n") if doc), trainer=trainer, length=None)
    tok.save(str(path))
    return Tokenizer.from_file(path)


def eval_text(data_dir: str | None, max_chars: int) -> str:
    """The first ``max_chars`` characters of techdocs-test, cut after the last complete paragraph."""
    text = load_text("techdocs-test", data_dir=data_dir, max_chars=max_chars)
    cut = text.rfind("\n\n")
    return text[: cut + 1] if cut > 0 else text


@torch.inference_mode()
def perplexity(model: MambaLMHeadModel, ids: torch.Tensor, seqlen: int, batch: int = 8) -> float:
    """exp(mean NLL) over non-overlapping windows of ``seqlen`` tokens (each predicts seqlen - 1)."""
    windows = eval_windows(ids, seqlen)
    nll, count = 0.0, 0
    for w in windows.split(batch):
        logits = model(w, mode="parallel")[:, :-1].float()
        targets = w[:, 1:].reshape(-1)
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, reduction="sum").item()
        count += w[:, 1:].numel()
    return math.exp(nll / count)


def lr_at(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def param_groups(model: MambaLMHeadModel, weight_decay: float) -> list[dict]:
    """Weight decay on the matrices (projections, embedding) only; not on A_log, D, dt_bias, norms,
    conv filters or biases (mamba-ssm marks A_log, D and dt_bias no-weight-decay too)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() == 2 else no_decay).append(p)
        assert p.dim() != 2 or "conv1d" not in name
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(THREADS)
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        # -- data and tokenizer
        train_text = load_text("techdocs", data_dir=args.data_dir, max_chars=args.train_chars)
        tok_path = Path(tmp) / "tokenizer.json"
        tok = train_tokenizer(train_text[: args.tokenizer_chars], args.vocab_size, tok_path)
        ids = torch.tensor(tok.encode(train_text), dtype=torch.long)
        held_out = eval_text(args.data_dir, args.eval_chars)
        eval_ids = torch.tensor(tok.encode(held_out), dtype=torch.long)
        print(f"tokenizer: {tok.vocab_size} tokens from {args.tokenizer_chars:,} chars; train text "
              f"{len(train_text):,} chars -> {ids.numel():,} tokens; eval text {len(held_out):,} chars -> "
              f"{eval_ids.numel():,} tokens ({time.perf_counter() - t_start:.1f}s)", flush=True)

        # -- model
        config = MambaConfig(
            d_model=args.d_model, n_layer=args.n_layer, vocab_size=tok.vocab_size,
            ssm_cfg={"layer": "Mamba2", "d_state": args.d_state, "headdim": args.headdim, "expand": 2,
                     "ngroups": 1, "chunk_size": 64},
            rms_norm=True, residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8,
            tie_embeddings=True,
        )
        model = MambaLMHeadModel(config)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"model: Mamba-2 d_model={args.d_model} n_layer={args.n_layer} d_state={args.d_state} "
              f"headdim={args.headdim} vocab={config.padded_vocab_size}: {n_params:,} parameters", flush=True)

        # -- training
        opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=BETAS, eps=1e-8)
        gen = torch.Generator().manual_seed(args.seed)
        offsets = torch.arange(args.seqlen + 1)
        losses: list[float] = []
        t_train = time.perf_counter()
        model.train()
        for step in range(args.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, args)
            starts = torch.randint(0, ids.numel() - args.seqlen - 1, (args.batch_size,), generator=gen)
            batch = ids[starts[:, None] + offsets]
            logits = model(batch[:, :-1], mode="parallel")
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(loss.item())
            if (step + 1) % 50 == 0 or step + 1 == args.steps:
                recent = sum(losses[-50:]) / len(losses[-50:])
                elapsed = time.perf_counter() - t_train
                eta = elapsed / (step + 1) * (args.steps - step - 1)
                print(f"step {step + 1}/{args.steps}: loss {loss.item():.4f} (last 50: {recent:.4f}), "
                      f"lr {lr_at(step, args):.2e}, {elapsed:.0f}s, eta {eta:.0f}s", flush=True)
        train_s = time.perf_counter() - t_train
        model.eval()
        final_loss = sum(losses[-50:]) / len(losses[-50:])
        ppl_fp32 = perplexity(model, eval_ids, args.seqlen)

        # -- save (float16, as the state-spaces checkpoints are)
        (out / EVAL_FILE).write_text(held_out, encoding="utf-8", newline="\n")
        params = {
            "data": {"train": f"techdocs train, first {len(train_text):,} characters",
                     "train_text_sha256": hashlib.sha256(train_text.encode()).hexdigest()[:16],
                     "tokenizer_chars": args.tokenizer_chars,
                     "eval": f"{EVAL_FILE}: first {len(held_out):,} characters of techdocs-test"},
            "tokenizer": {"type": "byte-level BPE", "vocab_size": tok.vocab_size, "special_tokens": [EOT]},
            "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "seqlen": args.seqlen,
            "optimizer": {"name": "AdamW", "lr": args.lr, "betas": list(BETAS),
                          "weight_decay": args.weight_decay,
                          "schedule": f"linear warmup {args.warmup} steps, cosine to 0.1 x lr",
                          "grad_clip": 1.0},
            "tokens_seen": args.steps * args.batch_size * args.seqlen,
            "threads": THREADS, "torch": torch.__version__, "tokenizers": tokenizers.__version__,
            "git_commit": git_commit(), "dtype": "float16", "n_params": n_params,
            "train_seconds": round(train_s, 1), "final_train_loss": round(final_loss, 4),
            "eval_ppl_fp32": round(ppl_fp32, 3),
        }
        manifest = record_stage(Manifest(source="scripts/train_demo_model.py"), "train", params,
                                input_hash=params["data"]["train_text_sha256"])
        state = {k: v.to(torch.float16) for k, v in model_state_dict(model).items()}
        save_checkpoint(out / MODEL_DIR, config, state, manifest, tokenizer_path=tok_path, force=True)
    # package data: world-readable (the checkpoint writer's temporary directory is private)
    (out / MODEL_DIR).chmod(0o755)
    for f in (out / MODEL_DIR).iterdir():
        f.chmod(0o644)

    # -- check what was written: reload (upcast to float32) and evaluate
    loaded, _ = load_model(out / MODEL_DIR)
    tok2 = Tokenizer.from_file(out / MODEL_DIR / "tokenizer.json")
    eval_ids2 = torch.tensor(tok2.encode((out / EVAL_FILE).read_text(encoding="utf-8")), dtype=torch.long)
    t_eval = time.perf_counter()
    ppl = perplexity(loaded, eval_ids2, args.seqlen)
    eval_s = time.perf_counter() - t_eval
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"final training loss (mean of last 50 steps): {final_loss:.4f}; training took {train_s:.0f}s")
    print(f"{EVAL_FILE} perplexity (seqlen {args.seqlen}, {eval_ids2.numel() // args.seqlen} windows): "
          f"{ppl:.3f} as saved (float16 weights), {ppl_fp32:.3f} before saving (float32); eval {eval_s:.2f}s")
    print(f"wrote {out / MODEL_DIR} and {out / EVAL_FILE}: {size / 1024:.0f} KiB under {out}; "
          f"total {time.perf_counter() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except MqtoolError as err:
        sys.exit(f"error: {err}")
