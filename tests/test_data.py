"""Tests for mqtool.data: dataset files and joining rules, data-root resolution, tokenizer, windows."""

from __future__ import annotations

import gzip
import json
import sys
import types
from pathlib import Path

import pytest
import tokenizers
import torch

from mqtool import data
from mqtool.errors import MqtoolError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
if not SHARED.is_dir():
    SHARED = Path("/work/shared/data")
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="shared/data not present")

WIKI_ROWS = ["", " = Title = \n", "", " First line , with text .\n", "", " Second @-@ line .\n"]
TEXT_WITH_BLANKS = (
    "Intro line.\n\nA\n\n\nB \n\nC\n\n D\n\n\n\n  E  \n\n F\t\n\n1\n\n 2\n\n.\n\n ,\n\n"
    " = = Title = = \n\n \n\n<|endoftext|>\n\n <|endoftext|>\n\nx's\n\n  end of it"
)


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No user data root, no `datasets`, no hub download, whatever the environment has."""
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError

    def no_hub(*args: object, **kwargs: object) -> str:
        raise ConnectionError("offline")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)


def _write_gz_lines(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _c4_rows(n: int) -> list[dict]:
    return [
        {
            "text": f"doc {i} says hello.\nSecond line {i}.",
            "timestamp": "2019-04-25T12:57:54Z",
            "url": f"u/{i}",
        }
        for i in range(n)
    ]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A tiny data root laid out like shared/data."""
    wiki = tmp_path / "wikitext-2-raw-v1"
    wiki.mkdir()
    (wiki / "test.json").write_text(json.dumps(WIKI_ROWS))
    (wiki / "validation.json").write_text(json.dumps(["", " Val row .\n"]))
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_bytes(b" = Title = \r\n First line .\r\n")
    _write_gz_lines(tmp_path / "c4" / "c4-validation-2k.json.gz", _c4_rows(1105))
    (tmp_path / "techdocs").mkdir()
    with gzip.open(tmp_path / "techdocs" / "train.txt.gz", "wb") as f:
        f.write(b"Section one.\r\n\r\nSection two is longer.\r\n" * 50)
    (tmp_path / "techdocs-test").mkdir()
    (tmp_path / "techdocs-test" / "test.txt").write_text("NAME\n  git-foo\n\nSYNOPSIS\n  git foo\n")
    return tmp_path


@pytest.fixture(scope="module")
def tiny_tokenizer_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer like GPT-NeoX's (same pre-tokenizer, space-run added tokens)."""
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT_WITH_BLANKS, " ".join(r["text"] for r in _c4_rows(50))] * 5, trainer)
    tok.add_tokens([" " * k for k in range(2, 6)])
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture
def model_dir(tmp_path: Path, tiny_tokenizer_file: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    (d / "tokenizer.json").write_bytes(tiny_tokenizer_file.read_bytes())
    return d


# ---------------------------------------------------------------------------------------------
# Datasets


def test_wikitext_rows_joined_with_blank_lines(root: Path) -> None:
    assert data.load_text("wikitext2", data_dir=root) == "\n\n".join(WIKI_ROWS)
    assert data.load_text("wikitext2", "test", data_dir=root) == "\n\n".join(WIKI_ROWS)
    assert data.load_text("wikitext2", "validation", data_dir=root) == "\n\n Val row .\n"


def test_c4_first_1100_documents_joined_with_spaces(root: Path) -> None:
    expected = " ".join(r["text"] for r in _c4_rows(1100))
    assert data.load_text("c4", data_dir=root) == expected


def test_c4_prefers_real_shard_zero(root: Path) -> None:
    _write_gz_lines(root / "c4" / "c4-validation.00000-of-00008.json.gz", _c4_rows(3)[1:])
    assert data.load_text("c4", data_dir=root) == " ".join(r["text"] for r in _c4_rows(3)[1:])


def test_techdocs_gz_universal_newlines_and_max_chars(root: Path) -> None:
    full = data.load_text("techdocs", data_dir=root)
    assert "\r" not in full
    assert full == "Section one.\n\nSection two is longer.\n" * 50
    assert data.load_text("techdocs", "train", data_dir=root, max_chars=20) == full[:20]
    assert data.load_text("techdocs-test", data_dir=root).startswith("NAME\n  git-foo\n\n")


def test_local_raw_file_crlf_read_as_is(tmp_path: Path) -> None:
    path = tmp_path / "wiki.test.raw"
    path.write_bytes(b" = A = \r\n text\r\n\r\nmore\r")
    assert data.load_text(str(path)) == " = A = \n text\n\nmore\n"
    assert data.read_text_file(path, max_chars=4) == " = A"


def test_local_path_relative_to_data_root(root: Path) -> None:
    assert data.load_text("wikitext-2-raw/wiki.test.raw", data_dir=root) == " = Title = \n First line .\n"


def test_local_json_jsonl_and_gz(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps(["x", "", "y"]))
    assert data.load_text(str(tmp_path / "a.json")) == "x\n\n\n\ny"
    (tmp_path / "b.json").write_text(json.dumps([{"text": "x"}, {"text": "y"}]))
    assert data.load_text(str(tmp_path / "b.json")) == "x\n\ny"
    _write_gz_lines(tmp_path / "c.jsonl.gz", _c4_rows(2))
    assert data.load_text(str(tmp_path / "c.jsonl.gz")) == "\n\n".join(r["text"] for r in _c4_rows(2))
    with gzip.open(tmp_path / "d.txt.gz", "wb") as f:
        f.write(b"one\r\ntwo")
    assert data.load_text(str(tmp_path / "d.txt.gz")) == "one\ntwo"


def test_bad_local_files_raise(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text('{"text": "not a list"}')
    with pytest.raises(MqtoolError, match="JSON list"):
        data.load_text(str(tmp_path / "a.json"))
    (tmp_path / "b.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(MqtoolError, match="b.jsonl:2"):
        data.load_text(str(tmp_path / "b.jsonl"))
    with pytest.raises(MqtoolError, match="no splits"):
        (tmp_path / "c.txt").write_text("hi")
        data.load_text(str(tmp_path / "c.txt"), split="test")


def test_env_var_resolution(root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(data.DATA_ENV, str(root))
    assert data.data_root() == root
    assert data.load_text("wikitext2") == "\n\n".join(WIKI_ROWS)
    other = tmp_path / "other"
    (other / "techdocs-test").mkdir(parents=True)
    (other / "techdocs-test" / "test.txt").write_text("explicit wins")
    assert data.load_text("techdocs-test", data_dir=other) == "explicit wins"


def test_missing_dataset_raises_with_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(MqtoolError, match="wikitext2.*datasets.*not installed.*MQTOOL_DATA") as exc:
        data.load_text("wikitext2")
    assert "\n" not in str(exc.value)
    with pytest.raises(MqtoolError, match=r"c4.*c4-validation-2k\.json\.gz.*--data-dir"):
        data.load_text("c4", data_dir=tmp_path)
    with pytest.raises(MqtoolError, match="techdocs.*local only"):
        data.load_text("techdocs", data_dir=tmp_path)
    with pytest.raises(MqtoolError, match="unknown dataset 'nope'"):
        data.load_text("nope")
    with pytest.raises(MqtoolError, match="no split 'train'"):
        data.load_text("c4", "train", data_dir=tmp_path)
    with pytest.raises(MqtoolError, match="does not exist"):
        data.load_text("wikitext2", data_dir=tmp_path / "missing")


def _fake_datasets(calls: list, fail: Exception | None = None) -> types.ModuleType:
    class Rows:
        def __init__(self, texts: list[str]) -> None:
            self.texts = texts

        def __len__(self) -> int:
            return len(self.texts)

        def __getitem__(self, key: str) -> list[str]:
            assert key == "text"
            return self.texts

        def select(self, idx: range) -> Rows:
            return Rows([self.texts[i] for i in idx])

    def load_dataset(*args: object, **kwargs: object) -> Rows:
        calls.append((args, kwargs))
        if fail is not None:
            raise fail
        return Rows([f"row{i}" for i in range(1200)])

    mod = types.ModuleType("datasets")
    mod.load_dataset = load_dataset  # type: ignore[attr-defined]
    return mod


def test_hub_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list = []
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets(calls))
    assert data.load_text("wikitext2", "train") == "\n\n".join(f"row{i}" for i in range(1200))
    assert calls[-1][0][1] == "wikitext-2-raw-v1" and calls[-1][1]["split"] == "train"
    assert data.load_text("c4") == " ".join(f"row{i}" for i in range(1100))
    assert calls[-1][0][0] == "allenai/c4"
    assert calls[-1][1]["data_files"] == {"validation": "en/c4-validation.00000-of-00008.json.gz"}


def test_hub_offline_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", _fake_datasets([], ConnectionError("no network\nmore")))
    with pytest.raises(MqtoolError, match="hub.*ConnectionError: no network.*MQTOOL_DATA") as exc:
        data.load_text("c4")
    assert "\n" not in str(exc.value)


def test_default_splits() -> None:
    assert data.default_split("wikitext2", "eval") == "test"
    assert data.default_split("wikitext2", "calibration") == "validation"
    assert data.default_split("c4", "eval") == data.default_split("c4", "calibration") == "validation"
    assert data.default_split("techdocs", "calibration") == "train"
    assert data.default_split("techdocs-test", "eval") == "test"
    assert data.default_split("some/file.txt", "eval") is None
    with pytest.raises(MqtoolError, match="no eval split"):
        data.default_split("techdocs", "eval")
    assert set(data.DATASETS) == {"wikitext2", "c4", "techdocs", "techdocs-test"}


# ---------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_from_model_dir(model_dir: Path) -> None:
    tok = data.load_tokenizer(model_dir)
    assert tok.path == str(model_dir / "tokenizer.json")
    ids = tok.encode("doc 3 says hello.")
    assert ids and all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == "doc 3 says hello."
    assert tok.decode(torch.tensor([ids])) == "doc 3 says hello."
    assert tok.eos_id == tok.encode("<|endoftext|>")[0]


def test_tokenizer_falls_back_to_data_root(tmp_path: Path, tiny_tokenizer_file: Path) -> None:
    neox = tmp_path / "tokenizers" / "gpt-neox-20b"
    neox.mkdir(parents=True)
    (neox / "tokenizer.json").write_bytes(tiny_tokenizer_file.read_bytes())
    empty_model = tmp_path / "model"
    empty_model.mkdir()
    assert data.load_tokenizer(empty_model, data_dir=tmp_path).path == str(neox / "tokenizer.json")
    assert data.load_tokenizer(None, data_dir=tmp_path).path == str(neox / "tokenizer.json")


def test_tokenizer_missing_raises(tmp_path: Path) -> None:
    with pytest.raises(MqtoolError, match=r"no tokenizer found.*tokenizer\.json.*hub.*MQTOOL_DATA"):
        data.load_tokenizer(tmp_path, data_dir=tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(MqtoolError, match="cannot load tokenizer"):
        data.load_tokenizer(tmp_path)


def test_split_at_blank_lines_round_trips() -> None:
    pieces = data.split_at_blank_lines(TEXT_WITH_BLANKS * 3, chunk_chars=10)
    assert "".join(pieces) == TEXT_WITH_BLANKS * 3
    assert len(pieces) > 10
    assert all(p.endswith("\n") for p in pieces[:-1])
    assert data.split_at_blank_lines("no blank lines here", chunk_chars=2) == ["no blank lines here"]


def test_chunked_encode_equals_single_encode(model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = data.load_tokenizer(model_dir)
    text = TEXT_WITH_BLANKS * 4
    single = tok.encode(text)  # shorter than the chunk size: one call
    monkeypatch.setattr(data, "_CHUNK_CHARS", 8)
    assert len(data.split_at_blank_lines(text, 8, tok._cut)) > 20
    assert tok.encode(text) == single


def test_chunking_disabled_for_stripping_added_tokens(tiny_tokenizer_file: Path) -> None:
    raw = tokenizers.Tokenizer.from_file(str(tiny_tokenizer_file))
    raw.add_special_tokens([tokenizers.AddedToken("<mask>", lstrip=True)])
    tok = data.Tokenizer(raw, "mem")
    assert tok._cut is None
    assert tok.encode(TEXT_WITH_BLANKS * 3) == raw.encode(TEXT_WITH_BLANKS * 3, add_special_tokens=False).ids


# ---------------------------------------------------------------------------------------------
# Windows


def test_eval_windows_shapes() -> None:
    ids = torch.arange(103)
    w = data.eval_windows(ids, 10)
    assert w.shape == (10, 10) and w.dtype == torch.long
    assert torch.equal(w.reshape(-1), torch.arange(100))
    assert data.eval_windows(ids.unsqueeze(0), 10, max_windows=3).shape == (3, 10)
    assert data.eval_windows(list(range(103)), 10, max_tokens=55).shape == (5, 10)
    assert data.eval_windows(ids, 10, max_windows=50).shape == (10, 10)
    with pytest.raises(MqtoolError, match="fewer than one window"):
        data.eval_windows(torch.arange(9), 10)


def test_calibration_windows_seeded() -> None:
    ids = torch.arange(1000).unsqueeze(0)
    a = data.calibration_windows(ids, 16, 32, seed=0)
    assert a.shape == (16, 32) and a.dtype == torch.long
    assert torch.equal(a, data.calibration_windows(ids, 16, 32, seed=0))
    assert not torch.equal(a, data.calibration_windows(ids, 16, 32, seed=1))
    # each window is a contiguous slice, never running past the end
    assert torch.equal(a - a[:, :1], torch.arange(32).expand(16, 32))
    assert int(a.max()) <= 998
    edge = data.calibration_windows(list(range(33)), 4, 32)
    assert torch.equal(edge, torch.arange(32).expand(4, 32))
    with pytest.raises(MqtoolError, match="needs at least seqlen \\+ 1 = 33"):
        data.calibration_windows(torch.arange(32), 4, 32)


def test_eval_tokens(root: Path, model_dir: Path) -> None:
    tok = data.load_tokenizer(model_dir)
    c4 = data.eval_tokens("c4", tok, seqlen=2, data_dir=root)
    assert c4.shape == (1, 512) and c4.dtype == torch.long
    assert c4[0].tolist() == tok.encode(data.load_text("c4", data_dir=root))[:512]
    wiki = data.eval_tokens("wikitext2", tok, seqlen=2, data_dir=root)
    assert wiki[0].tolist() == tok.encode("\n\n".join(WIKI_ROWS))
    raw = data.eval_tokens(str(root / "wikitext-2-raw" / "wiki.test.raw"), tok, seqlen=2)
    assert raw[0].tolist() == tok.encode(" = Title = \n First line .\n")


# ---------------------------------------------------------------------------------------------
# The real shared data (present in CI at ../shared)


@needs_shared
def test_shared_wikitext2_test_length() -> None:
    assert len(data.load_text("wikitext2", "test", data_dir=SHARED)) == 1_294_336


@needs_shared
def test_shared_tokenizers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(data.DATA_ENV, str(SHARED))
    neox = data.load_tokenizer(None)
    assert neox.encode("Hello world") == [12092, 1533]
    assert neox.vocab_size == 50277
    assert neox._cut is not None
    ref = SHARED.parent / "models" / "mamba2-ref-25m"
    if (ref / "tokenizer.json").is_file():
        assert data.load_tokenizer(ref).encode("Hello world") == [8053, 6238]
    # chunked encoding of real text gives the ids of one encode() call
    text = data.load_text("wikitext2", data_dir=SHARED, max_chars=300_000)
    monkeypatch.setattr(data, "_CHUNK_CHARS", 4096)
    assert neox.encode(text) == neox._encode_one(text)
