"""Text datasets, the tokenizer, and token windows for calibration and evaluation.

Named datasets are read from a local data root (``data_dir`` argument, else ``$MQTOOL_DATA``) laid
out like ``shared/data``, else from the Hugging Face hub through the optional ``datasets`` package.
Any other name is taken as a path to a local text file (.txt/.raw, .json, .jsonl, each optionally
.gz). Evaluation text follows GPTQ: WikiText-2 is ``"\\n\\n".join(rows)``; C4 is ``" ".join`` of the
first 1,100 documents of validation shard 0, cut to ``256 * seqlen`` tokens.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TextIO

import tokenizers
import torch

from mqtool.errors import MqtoolError

DATA_ENV = "MQTOOL_DATA"
C4_EVAL_DOCS = 1100
C4_EVAL_WINDOWS = 256
C4_HUB_SHARD = "en/c4-validation.00000-of-00008.json.gz"
NEOX_TOKENIZER = "EleutherAI/gpt-neox-20b"
NEOX_LOCAL = Path("tokenizers") / "gpt-neox-20b" / "tokenizer.json"

Purpose = Literal["eval", "calibration"]


@dataclass(frozen=True)
class DatasetSpec:
    """A named dataset: its splits, default splits, and where each split lives under the data root."""

    name: str
    description: str
    eval_split: str | None
    calib_split: str | None
    # split -> candidate paths relative to the data root, first found wins
    files: dict[str, tuple[str, ...]] = field(default_factory=dict)
    hub: bool = True

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.files)


DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "wikitext2",
            "WikiText-2 raw (wikitext-2-raw-v1), GPTQ-style '\\n\\n'.join of the rows",
            eval_split="test",
            calib_split="validation",
            files={
                "test": ("wikitext-2-raw-v1/test.json",),
                "validation": ("wikitext-2-raw-v1/validation.json",),
                "train": ("wikitext-2-raw-v1/train.json",),
            },
        ),
        DatasetSpec(
            "c4",
            "C4 en validation, ' '.join of the first 1,100 documents (GPTQ); eval uses 256*seqlen tokens",
            eval_split="validation",
            calib_split="validation",
            # the real shard 0 first, so GPTQ numbers are exact when it is present
            files={"validation": ("c4/c4-validation.00000-of-00008.json.gz", "c4/c4-validation-2k.json.gz")},
        ),
        DatasetSpec(
            "techdocs",
            "technical English prose (kernel, Python, Perl, PostgreSQL docs), 52 MB; local only",
            eval_split=None,
            calib_split="train",
            files={"train": ("techdocs/train.txt.gz", "techdocs/train.txt")},
            hub=False,
        ),
        DatasetSpec(
            "techdocs-test",
            "held-out technical English (git manuals, Linux man-pages 2), tokenized as is; local only",
            eval_split="test",
            calib_split=None,
            files={"test": ("techdocs-test/test.txt", "techdocs-test/test.txt.gz")},
            hub=False,
        ),
    )
}


def default_split(name: str, purpose: Purpose = "eval") -> str | None:
    """The split a named dataset uses for ``purpose``; None for a local file (no splits)."""
    spec = DATASETS.get(name)
    if spec is None:
        return None
    split = spec.eval_split if purpose == "eval" else spec.calib_split
    if split is None:
        raise MqtoolError(f"dataset '{name}' has no {purpose} split (splits: {', '.join(spec.splits)})")
    return split


def data_root(data_dir: str | Path | None = None) -> Path | None:
    """The local data root: ``data_dir`` if given, else ``$MQTOOL_DATA``, else None."""
    if data_dir is not None and str(data_dir) != "":
        root, origin = Path(data_dir).expanduser(), "--data-dir"
    elif os.environ.get(DATA_ENV):
        root, origin = Path(os.environ[DATA_ENV]).expanduser(), DATA_ENV
    else:
        return None
    if not root.is_dir():
        raise MqtoolError(f"data directory {root} (from {origin}) does not exist or is not a directory")
    return root


# ----------------------------------------------------------------------------------------------
# Reading text


def _open_text(path: Path) -> TextIO:
    # newline=None: universal newlines, so CRLF files read the same as LF ones
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline=None)
    return open(path, encoding="utf-8", newline=None)


def _kind(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    return {".json": "json", ".jsonl": "jsonl"}.get(last, "text")


def _row_text(row: object, where: str) -> str:
    if isinstance(row, str):
        return row
    if isinstance(row, dict) and isinstance(row.get("text"), str):
        return row["text"]
    raise MqtoolError(f"{where}: expected a string or an object with a string 'text' field")


def iter_json_lines(path: Path) -> Iterator[tuple[int, object]]:
    """``(line number, parsed row)`` of a JSON-lines file (optionally gzipped), blank lines skipped;
    a line that is not JSON is an MqtoolError naming the file and line."""
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield lineno, json.loads(line)
                except json.JSONDecodeError as err:
                    raise MqtoolError(f"{path}:{lineno}: invalid JSON ({err.msg})") from err


def _iter_jsonl(path: Path) -> Iterator[str]:
    for lineno, row in iter_json_lines(path):
        yield _row_text(row, f"{path}:{lineno}")


def read_text_file(path: str | Path, max_chars: int | None = None) -> str:
    """Read a local text file: .txt/.raw as is; .json list of strings and .jsonl "text" rows joined
    with blank lines ("\\n\\n"); any of them optionally gzipped. ``max_chars`` keeps a prefix."""
    path = Path(path)
    try:
        kind = _kind(path)
        if kind == "text":
            with _open_text(path) as f:
                # reading only a prefix keeps calibration on the 52 MB techdocs cheap
                return f.read(-1 if max_chars is None else max_chars)
        if kind == "json":
            with _open_text(path) as f:
                try:
                    rows = json.load(f)
                except json.JSONDecodeError as err:
                    raise MqtoolError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from err
            if not isinstance(rows, list):
                raise MqtoolError(f"{path}: expected a JSON list of strings")
            text = "\n\n".join(_row_text(r, f"{path}[{i}]") for i, r in enumerate(rows))
        else:
            text = "\n\n".join(_iter_jsonl(path))
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise MqtoolError(f"cannot read {path}: {err}") from err
    return text if max_chars is None else text[:max_chars]


def _read_c4(path: Path) -> str:
    docs: list[str] = []
    try:
        for text in _iter_jsonl(path):
            docs.append(text)
            if len(docs) == C4_EVAL_DOCS:
                break
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise MqtoolError(f"cannot read {path}: {err}") from err
    return " ".join(docs)


def _hub_text(name: str, split: str) -> str:
    import datasets  # optional dependency, only needed without local data

    if name == "wikitext2":
        rows = datasets.load_dataset("Salesforce/wikitext", "wikitext-2-raw-v1", split=split)["text"]
        return "\n\n".join(rows)
    if name == "c4":
        ds = datasets.load_dataset("allenai/c4", data_files={"validation": C4_HUB_SHARD}, split="validation")
        return " ".join(ds.select(range(min(C4_EVAL_DOCS, len(ds))))["text"])
    raise ValueError(f"no hub source for {name}")


def _local_file(name: str, root: Path | None) -> Path | None:
    path = Path(name).expanduser()
    if path.is_file():
        return path
    # a relative path may be given relative to the data root, e.g. wikitext-2-raw/wiki.test.raw
    if root is not None and not path.is_absolute() and (root / path).is_file():
        return root / path
    return None


def load_text(
    name: str,
    split: str | None = None,
    data_dir: str | Path | None = None,
    max_chars: int | None = None,
) -> str:
    """The text of a named dataset split (default: its eval split, else its calibration split) or
    of a local file. ``max_chars`` returns only that many leading characters."""
    if max_chars is not None and max_chars <= 0:
        raise MqtoolError(f"max_chars must be positive, got {max_chars}")
    root = data_root(data_dir)
    spec = DATASETS.get(name)
    if spec is None:
        path = _local_file(name, root)
        if path is None:
            where = f" (nor under {root})" if root is not None else ""
            raise MqtoolError(
                f"unknown dataset '{name}': not one of {', '.join(DATASETS)} and no such file{where}"
            )
        if split is not None:
            raise MqtoolError(f"dataset '{name}' is a local file and has no splits (got split '{split}')")
        return read_text_file(path, max_chars)

    split = split or spec.eval_split or spec.calib_split
    assert split is not None
    if split not in spec.files:
        raise MqtoolError(f"dataset '{name}' has no split '{split}' (splits: {', '.join(spec.splits)})")

    looked: list[str] = []
    if root is not None:
        for rel in spec.files[split]:
            path = root / rel
            if path.is_file():
                text = _read_c4(path) if name == "c4" else read_text_file(path, max_chars)
                return text if max_chars is None else text[:max_chars]
            looked.append(str(path))
    else:
        looked.append(f"no local data root (--data-dir / {DATA_ENV} unset)")

    if spec.hub:
        try:
            text = _hub_text(name, split)
        except ImportError:
            looked.append("the Hugging Face hub (the 'datasets' package is not installed)")
        except Exception as err:  # offline / hub errors come in many types
            looked.append(
                f"the Hugging Face hub ({type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]})"
            )
        else:
            return text if max_chars is None else text[:max_chars]
    else:
        looked.append("not on the hub (local only)")
    raise MqtoolError(
        f"dataset '{name}' split '{split}' not found: looked in {'; '.join(looked)}; "
        f"set --data-dir or {DATA_ENV} to a folder laid out like shared/data"
    )


# ----------------------------------------------------------------------------------------------
# Tokenizer

# Chunk boundaries for parallel encoding: inside a blank-line whitespace run, just before its last
# character, where that character is "\n" or " " and the next one is not whitespace (nor the start
# of an added token such as <|endoftext|>). With a byte-level BPE (GPT-2 / GPT-NeoX pre-tokenizer
# regex, added tokens made of spaces) a pre-token boundary always falls there, so encoding the
# chunks gives exactly the ids of one encode() call.
_CUT = re.compile(r"\n(?=\n\S)|\n\n(?= \S)")
_CHUNK_CHARS = 1 << 16
_PROBE = (
    "Hello world.\n\nA\n\n\nB \n\nC\n\n D\n\n\n\n  E  \n\n F\t\n\n1\n\n 2\n\n.\n\n ,\n\n"
    " = = Title = = \n\n \n\n<|endoftext|>\n\n <|endoftext|>\n\nx's\n\n  end"
)


def _cut_pattern(tok: tokenizers.Tokenizer) -> re.Pattern[str] | None:
    """The chunk boundaries for ``tok``, or None where added tokens could straddle them."""
    added = list(tok.get_added_tokens_decoder().values())
    if any(a.lstrip or a.rstrip or a.single_word for a in added):
        return None
    firsts = sorted({a.content[0] for a in added if a.content and not a.content[0].isspace()})
    after = "[^\\s" + "".join(re.escape(c) for c in firsts) + "]"
    return re.compile(rf"\n(?=\n{after})|\n\n(?= {after})")


def split_at_blank_lines(
    text: str, chunk_chars: int = _CHUNK_CHARS, pattern: re.Pattern[str] = _CUT
) -> list[str]:
    """Split ``text`` into pieces of at least ``chunk_chars`` characters (except the last) at
    blank-line ("\\n\\n") boundaries; ``"".join`` of the pieces is ``text``."""
    pieces: list[str] = []
    pos = 0
    while len(text) - pos > chunk_chars:
        m = pattern.search(text, pos + chunk_chars)
        if m is None:
            break
        pieces.append(text[pos : m.end()])
        pos = m.end()
    pieces.append(text[pos:])
    return pieces


class Tokenizer:
    """A ``tokenizers.Tokenizer`` that encodes without special tokens.

    Texts longer than 64K characters are encoded in chunks cut at blank lines ("\\n\\n", see
    ``split_at_blank_lines``) with ``encode_batch`` to use all cores. For byte-level BPE tokenizers
    this gives the same ids as one ``encode`` call; a probe checks that on load, and a tokenizer
    that fails it is always encoded in one call.
    """

    def __init__(self, tok: tokenizers.Tokenizer, path: str | Path) -> None:
        self._tok = tok
        self.path = str(path)
        self._cut = _cut_pattern(tok)
        if self._cut is not None and self._encode_chunked(_PROBE, 4) != self._encode_one(_PROBE):
            self._cut = None

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        try:
            return cls(tokenizers.Tokenizer.from_file(str(path)), path)
        except Exception as err:  # the Rust side raises plain Exception
            raise MqtoolError(f"cannot load tokenizer {path}: {err}") from err

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (GPT-NeoX: 50,277)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int | None:
        """Id of ``<|endoftext|>`` if the vocabulary has it."""
        return self._tok.token_to_id("<|endoftext|>")

    def _encode_one(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _encode_chunked(self, text: str, chunk_chars: int) -> list[int]:
        assert self._cut is not None
        pieces = split_at_blank_lines(text, chunk_chars, self._cut)
        return [i for enc in self._tok.encode_batch(pieces, add_special_tokens=False) for i in enc.ids]

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, no special tokens added."""
        if len(text) > _CHUNK_CHARS and self._cut is not None:
            return self._encode_chunked(text, _CHUNK_CHARS)
        return self._encode_one(text)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of ``ids`` (special tokens kept)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size})"


def load_tokenizer(model_dir: str | Path | None, data_dir: str | Path | None = None) -> Tokenizer:
    """The model's ``tokenizer.json`` if it has one, else GPT-NeoX-20B (every state-spaces Mamba
    checkpoint uses it) from ``<data root>/tokenizers/gpt-neox-20b``, else from the hub."""
    looked: list[str] = []
    if model_dir is not None:
        path = Path(model_dir) / "tokenizer.json"
        if path.is_file():
            return Tokenizer.from_file(path)
        looked.append(str(path))
    root = data_root(data_dir)
    if root is not None:
        path = root / NEOX_LOCAL
        if path.is_file():
            return Tokenizer.from_file(path)
        looked.append(str(path))
    try:
        from huggingface_hub import hf_hub_download

        return Tokenizer.from_file(hf_hub_download(NEOX_TOKENIZER, "tokenizer.json"))
    except MqtoolError:
        raise
    except Exception as err:  # offline / hub errors come in many types
        looked.append(f"the Hugging Face hub {NEOX_TOKENIZER} ({type(err).__name__})")
    raise MqtoolError(
        f"no tokenizer found: looked in {'; '.join(looked)}; "
        f"set --data-dir or {DATA_ENV} to a folder with {NEOX_LOCAL.as_posix()}"
    )


# ----------------------------------------------------------------------------------------------
# Windows


def _flat_ids(ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    t = ids if isinstance(ids, torch.Tensor) else torch.tensor(list(ids), dtype=torch.long)
    return t.reshape(-1).long()


def eval_windows(
    ids: torch.Tensor | Sequence[int],
    seqlen: int,
    max_windows: int | None = None,
    max_tokens: int | None = None,
) -> torch.Tensor:
    """Non-overlapping ``[n, seqlen]`` windows from the start, the tail dropped (GPTQ:
    ``n = numel // seqlen``), after cutting to ``max_tokens`` and at most ``max_windows``."""
    if seqlen <= 0:
        raise MqtoolError(f"seqlen must be positive, got {seqlen}")
    flat = _flat_ids(ids)
    if max_tokens is not None:
        flat = flat[:max_tokens]
    n = flat.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n <= 0:
        raise MqtoolError(f"text has {flat.numel()} tokens, fewer than one window of seqlen {seqlen}")
    return flat[: n * seqlen].reshape(n, seqlen).clone()


def calibration_windows(
    ids: torch.Tensor | Sequence[int], n: int, seqlen: int, seed: int = 0
) -> torch.Tensor:
    """``n`` random ``[n, seqlen]`` windows (start in ``[0, numel - seqlen - 1]`` as in GPTQ),
    drawn from a ``torch.Generator`` seeded with ``seed``: the same seed gives the same windows."""
    if n <= 0 or seqlen <= 0:
        raise MqtoolError(f"calibration needs n > 0 and seqlen > 0, got n={n}, seqlen={seqlen}")
    flat = _flat_ids(ids)
    if flat.numel() < seqlen + 1:
        raise MqtoolError(
            f"calibration text has {flat.numel()} tokens, needs at least seqlen + 1 = {seqlen + 1}"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, flat.numel() - seqlen, (n,), generator=gen)
    return flat[starts[:, None] + torch.arange(seqlen)]


def eval_tokens(
    name: str,
    tokenizer: Tokenizer,
    seqlen: int,
    data_dir: str | Path | None = None,
    split: str | None = None,
) -> torch.Tensor:
    """The ``[1, T]`` tokens an evaluation on ``name`` uses: all of them, except C4 which is cut to
    ``256 * seqlen`` tokens as in GPTQ."""
    split = split if split is not None else default_split(name, "eval")
    ids = torch.tensor(tokenizer.encode(load_text(name, split, data_dir)), dtype=torch.long)
    if name == "c4":
        ids = ids[: C4_EVAL_WINDOWS * seqlen]
    return ids.unsqueeze(0)
