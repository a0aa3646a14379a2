"""UMT5Tokenizer: cleaning, EOS/padding/truncation, HF parity, folder errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from kinema.errors import ModelFolderError
from kinema.train.tiny_tokenizer import make_tiny_tokenizer
from kinema.tokenizer import UMT5Tokenizer, clean

PROMPTS = [
    "A red fox runs across a snowy field.",
    "  Two   cats\tsleep \n\n near   the river  ",
    "fox &amp;lt;b&amp;gt; bold &amp;amp; brave &quot;ok&quot;",
    "cafÃ© naÃ¯ve",  # mojibake that ftfy repairs
    "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ ① and zebra!",
    "",
    "word " * 700,  # longer than 512 tokens
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "google" / "umt5-xxl")


def test_clean_matches_official_rules():
    assert clean("  a \t\n b   c  ") == "a b c"
    assert clean("&amp;lt;b&amp;gt;") == "<b>"  # unescaped twice
    # ftfy leaves HTML alone when the text holds "<"; then exactly two unescapes remain.
    assert clean("<p>&amp;amp;amp;") == "<p>&amp;"
    assert clean("cafÃ©") == "café"  # ftfy
    assert clean("x\u3000\u00a0y") == "x y"


def test_special_ids_and_layout(tok_dir):
    tok = UMT5Tokenizer.from_dir(tok_dir)
    assert (tok.pad_id, tok.eos_id, tok.unk_id) == (0, 1, 2)
    assert tok.vocab_size == 256
    # The model-root layouts (official google/umt5-xxl/, diffusers tokenizer/) are found too.
    assert UMT5Tokenizer.from_dir(tok_dir.parent.parent).folder == tok_dir
    diffusers_root = tok_dir.parent.parent.parent / "diffusers_like"
    shutil.copytree(tok_dir, diffusers_root / "tokenizer", dirs_exist_ok=True)
    assert UMT5Tokenizer.from_dir(diffusers_root).folder == diffusers_root / "tokenizer"


def test_eos_padding_truncation(tok_dir):
    tok = UMT5Tokenizer.from_dir(tok_dir)
    ids, mask = tok(PROMPTS, max_length=32)
    assert ids.shape == mask.shape == (len(PROMPTS), 32)
    assert ids.dtype == mask.dtype == torch.long
    lengths = mask.sum(1)
    for b in range(len(PROMPTS)):
        n = int(lengths[b])
        assert mask[b, :n].eq(1).all() and mask[b, n:].eq(0).all()
        assert ids[b, n - 1] == tok.eos_id and ids[b, n:].eq(tok.pad_id).all()
        assert not ids[b, : n - 1].eq(tok.eos_id).any()
    assert int(lengths[PROMPTS.index("")]) == 1  # EOS only
    long = PROMPTS.index("word " * 700)
    assert int(lengths[long]) == 32  # truncated, EOS kept in the last slot
    # Truncation keeps the same leading tokens as the untruncated text.
    full = tok.encode(PROMPTS[long], max_length=10_000)
    assert ids[long, :31].tolist() == full[:31]


def test_cleaning_applied_before_tokenizing(tok_dir):
    tok = UMT5Tokenizer.from_dir(tok_dir)
    ids_a, _ = tok(["  a red   fox &amp;amp; cat "], max_length=24)
    ids_b, _ = tok(["a red fox & cat"], max_length=24)
    assert torch.equal(ids_a, ids_b)


def test_tokenizer_json_matches_spiece_model(tok_dir, tmp_path):
    only_spm = tmp_path / "spm"
    shutil.copytree(tok_dir, only_spm)
    (only_spm / "tokenizer.json").unlink()
    fast, slow = UMT5Tokenizer.from_dir(tok_dir), UMT5Tokenizer.from_dir(only_spm)
    for text in PROMPTS:
        assert fast.encode(text, 600) == slow.encode(text, 600), text


def test_hf_tokenizer_parity(tok_dir, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    ours = UMT5Tokenizer.from_dir(tok_dir)
    for max_length in (512, 16):
        ref = hf([clean(p) for p in PROMPTS], padding="max_length", truncation=True,
                 max_length=max_length, add_special_tokens=True, return_tensors="pt")
        ids, mask = ours(PROMPTS, max_length=max_length)
        assert torch.equal(ids, ref["input_ids"])
        assert torch.equal(mask, ref["attention_mask"])


def test_tiny_tokenizer_is_deterministic(tmp_path, tok_dir):
    again = make_tiny_tokenizer(tmp_path / "again")
    for name in ("spiece.model", "tokenizer.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (tok_dir / name).read_bytes()


def test_missing_tokenizer_names_folder(tmp_path):
    with pytest.raises(ModelFolderError, match=str(tmp_path)):
        UMT5Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("name", ["tokenizer.json", "spiece.model"])
def test_corrupt_tokenizer_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x00 not a tokenizer {")
    with pytest.raises(ModelFolderError, match=name):
        UMT5Tokenizer.from_dir(tmp_path)
