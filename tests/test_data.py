"""Calibration data: text sources, seeded windows, BOS handling, batches and padding."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import _tokenizer_json, tiny_tokenizer

from simdiff.core.errors import SimdiffError
from simdiff.data import (
    batches,
    bos_token_id,
    calibration_windows,
    contiguous_windows,
    load_text,
    pad_sequences,
    sample_windows,
    tokenize_text,
)
from simdiff.data.text import text_variant

IDS = torch.arange(100, 200)


def bos_tokenizer():
    """The tiny tokenizer, but one that starts every sequence with <s> (id 1), like LLaMA's."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_tokenizer_json())
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def test_sample_windows_are_seeded_slices() -> None:
    a = sample_windows(IDS, samples=5, seq_len=8, seed=3)
    assert a.shape == (5, 8)
    assert torch.equal(a, sample_windows(IDS, 5, 8, seed=3))
    assert not torch.equal(a, sample_windows(IDS, 5, 8, seed=4))
    for row in a:  # every window is a contiguous slice of the text
        assert torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 8))
    assert int(a.max()) <= 199


def test_sample_windows_with_bos() -> None:
    w = sample_windows(IDS, samples=3, seq_len=8, seed=0, bos=1)
    assert w.shape == (3, 8)
    assert (w[:, 0] == 1).all()
    assert torch.equal(w[:, 1:], sample_windows(IDS, 3, 7, seed=0))  # BOS + 7 text tokens, same offsets


def test_window_errors() -> None:
    with pytest.raises(SimdiffError, match="text too short: 100 tokens.*--calib-seq-len \\(now 200\\)"):
        sample_windows(IDS, 2, 200, seed=0)
    with pytest.raises(SimdiffError, match="samples >= 1"):
        sample_windows(IDS, 0, 8, seed=0)
    with pytest.raises(SimdiffError, match="text too short"):
        contiguous_windows(IDS, 101)
    with pytest.raises(SimdiffError, match="batch size must be >= 1"):
        batches(IDS.view(10, 10), 0)


def test_contiguous_windows() -> None:
    w = contiguous_windows(IDS, 30)
    assert w.shape == (3, 30) and torch.equal(w.flatten(), IDS[:90])  # the partial last window is dropped
    w = contiguous_windows(IDS, 10, bos=1, max_tokens=40)
    assert w.shape == (4, 10) and (w[:, 0] == 1).all() and torch.equal(w[:, 1:].flatten(), IDS[:36])


def test_batches_and_padding() -> None:
    parts = batches(IDS.view(5, 20), 2)
    assert [b.input_ids.shape[0] for b in parts] == [2, 2, 1]
    assert all(b.attention_mask.sum() == b.input_ids.numel() for b in parts)
    padded = pad_sequences([[5, 6, 7], [8]], pad_id=0)
    assert padded.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert padded.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_load_text_sources(tmp_path, shared_data) -> None:
    (tmp_path / "a.txt").write_text("first file", encoding="utf-8")
    rows = [{"text": "row one"}, {"text": "row two", "extra": 1}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    (tmp_path / "ignored.csv").write_text("x,y", encoding="utf-8")
    assert load_text(str(tmp_path / "a.txt")) == "first file"
    assert load_text(str(tmp_path / "b.jsonl")) == "row one\n\nrow two"
    assert load_text(str(tmp_path)) == "first file\n\nrow one\n\nrow two"  # sorted; other suffixes ignored
    valid = load_text("wikitext2", "valid", root=shared_data)
    assert valid == (shared_data / "wikitext-2" / "valid.txt").read_text(encoding="utf-8")
    assert load_text("wikitext2", "test", root=shared_data) != valid


def test_wikitext2_is_the_raw_text_and_every_result_names_its_variant(shared_data) -> None:
    raw = load_text("wikitext2", "test", root=shared_data)
    assert raw == (shared_data / "wikitext-2-raw" / "test.txt").read_text(encoding="utf-8")
    assert "<unk>" not in raw  # the raw release (no <unk> replacement), as `datasets` serves wikitext-2-raw-v1
    tokenised = load_text("wikitext2-tok", "test", root=shared_data)
    assert "<unk>" in tokenised and tokenised == (shared_data / "wikitext-2" / "test.txt").read_text(encoding="utf-8")
    assert text_variant("wikitext2", "test", shared_data).startswith("wikitext-2-raw-v1/test (")
    assert text_variant("wikitext2-tok", "test", shared_data).startswith("wikitext-2-v1 (tokenised)/test (")
    # no raw validation split in the shared folder: calibration reads the tokenised one and says so
    assert text_variant("wikitext2", "valid", shared_data).startswith("wikitext-2-v1 (tokenised)/valid (")
    assert text_variant("notes.txt", "valid", shared_data) == "notes.txt"


def test_load_text_errors(tmp_path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    (tmp_path / "notext.jsonl").write_text('{"body": "x"}\n', encoding="utf-8")
    (tmp_path / "data.csv").write_text("x", encoding="utf-8")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SimdiffError, match="bad.jsonl:2 is not valid JSON"):
        load_text(str(tmp_path / "bad.jsonl"))
    with pytest.raises(SimdiffError, match="notext.jsonl:1 has no 'text' field"):
        load_text(str(tmp_path / "notext.jsonl"))
    with pytest.raises(SimdiffError, match="expected a .txt or .jsonl file, got '.csv'"):
        load_text(str(tmp_path / "data.csv"))
    with pytest.raises(SimdiffError, match="holds no .txt or .jsonl files"):
        load_text(str(tmp_path / "empty"))
    with pytest.raises(SimdiffError, match="text source 'wikitext3' not found"):
        load_text("wikitext3")
    with pytest.raises(SimdiffError, match="must hold wikitext-2-raw/valid.txt or wikitext-2/valid.txt"):
        load_text("wikitext2", "valid", root=tmp_path)
    with pytest.raises(SimdiffError, match="the text is empty"):
        tokenize_text(tiny_tokenizer(), "  \n ")


def test_bos_detection_and_calibration_windows(shared_data) -> None:
    plain, with_bos = tiny_tokenizer(), bos_tokenizer()
    assert bos_token_id(plain) is None  # has a BOS token, but does not prepend it
    assert bos_token_id(with_bos) == 1
    w = calibration_windows(with_bos, "wikitext2", samples=3, seq_len=16, seed=0, data_root=str(shared_data))
    assert w.shape == (3, 16) and (w[:, 0] == 1).all() and (w[:, 1:] != 1).all()
    p = calibration_windows(plain, "wikitext2", samples=3, seq_len=15, seed=0, data_root=str(shared_data))
    assert p.shape == (3, 15) and torch.equal(p, w[:, 1:])  # same 15 text tokens, without the BOS
    again = calibration_windows(plain, "wikitext2", samples=3, seq_len=15, seed=0, data_root=str(shared_data))
    assert torch.equal(p, again)
    assert not tokenize_text(plain, "hello world").eq(1).any()  # no special tokens in the text ids
