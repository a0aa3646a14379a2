"""The umT5 tokenizer as the Wan pipelines use it: clean, tokenize, append EOS, pad to 512.

Loaded from a local HF-style folder (official `google/umt5-xxl/` or diffusers `tokenizer/`):
`tokenizer.json` through the `tokenizers` library when present (what HF's fast tokenizer runs),
otherwise `spiece.model` through `sentencepiece`. Never touches the network.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from .errors import ModelFolderError

# Where a tokenizer may sit below a model folder (official layout, diffusers layout).
_SUBFOLDERS = ("", "google/umt5-xxl", "tokenizer")
_DEFAULT_TOKENS = {"pad": "<pad>", "eos": "</s>", "unk": "<unk>"}
_WHITESPACE = re.compile(r"\s+")


def clean(text: str) -> str:
    """Official prompt cleaning: ftfy, HTML-unescape twice, strip, collapse whitespace runs."""
    import ftfy  # imported lazily: only needed when prompts are cleaned

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


def find_tokenizer_dir(path: str | Path) -> Path:
    """The folder holding tokenizer.json or spiece.model: `path` itself or a known subfolder."""
    root = Path(path)
    for sub in _SUBFOLDERS:
        folder = root / sub if sub else root
        if (folder / "tokenizer.json").is_file() or (folder / "spiece.model").is_file():
            return folder
    raise ModelFolderError(f"no tokenizer (tokenizer.json or spiece.model) found in {root}")


def _token_content(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json / special_tokens_map.json as a string."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _special_tokens(folder: Path) -> dict[str, str]:
    """pad/eos/unk token strings declared by the folder's config files (defaults: umT5's)."""
    tokens = dict(_DEFAULT_TOKENS)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = folder / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelFolderError(f"corrupt tokenizer file {file}: {exc}") from None
        for kind in tokens:
            content = _token_content(data.get(f"{kind}_token")) if isinstance(data, dict) else None
            if content:
                tokens[kind] = content
    return tokens


class UMT5Tokenizer:
    """Prompts -> (ids [B, L], mask [B, L]) int64, right-padded to `max_length`, EOS appended.

    Matches HF's T5 tokenizer called with padding="max_length", truncation=True and
    add_special_tokens=True: no BOS, the text is cut to `max_length - 1` tokens and "</s>" is
    appended, then pad ids fill the rest (mask 0 there).
    """

    def __init__(
        self,
        encode_batch: Callable[[list[str]], list[list[int]]],
        pad_id: int,
        eos_id: int,
        unk_id: int,
        vocab_size: int,
        folder: Path | None = None,
        clean_text: bool = True,
    ) -> None:
        self._encode_batch = encode_batch
        self.pad_id, self.eos_id, self.unk_id = pad_id, eos_id, unk_id
        self.vocab_size = vocab_size
        self.folder = folder
        self.clean_text = clean_text

    @classmethod
    def from_dir(cls, path: str | Path, clean_text: bool = True) -> "UMT5Tokenizer":
        """Load from a tokenizer folder, or a model folder with `google/umt5-xxl/` or `tokenizer/`."""
        folder = find_tokenizer_dir(path)
        tokens = _special_tokens(folder)
        if (folder / "tokenizer.json").is_file():
            return cls._from_tokenizer_json(folder, tokens, clean_text)
        return cls._from_sentencepiece(folder, tokens, clean_text)

    @classmethod
    def _from_tokenizer_json(cls, folder: Path, tokens: dict[str, str], clean_text: bool) -> "UMT5Tokenizer":
        from tokenizers import Tokenizer

        file = folder / "tokenizer.json"
        try:
            tok = Tokenizer.from_file(str(file))
        except Exception as exc:  # the library raises a bare Exception on bad JSON
            raise ModelFolderError(f"corrupt tokenizer file {file}: {exc}") from None
        # Truncation, EOS and padding are done here, not by settings stored in the file.
        tok.no_truncation()
        tok.no_padding()
        ids = {}
        for kind, content in tokens.items():
            ids[kind] = tok.token_to_id(content)
            if ids[kind] is None:
                raise ModelFolderError(f"tokenizer in {folder} has no {kind} token {content!r}")

        def encode_batch(texts: list[str]) -> list[list[int]]:
            return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]

        return cls(encode_batch, ids["pad"], ids["eos"], ids["unk"], tok.get_vocab_size(), folder, clean_text)

    @classmethod
    def _from_sentencepiece(cls, folder: Path, tokens: dict[str, str], clean_text: bool) -> "UMT5Tokenizer":
        import sentencepiece as spm

        file = folder / "spiece.model"
        try:
            sp = spm.SentencePieceProcessor(model_file=str(file))
        except Exception as exc:
            raise ModelFolderError(f"corrupt tokenizer file {file}: {exc}") from None
        ids = {}
        for kind, content in tokens.items():
            found = sp.piece_to_id(content)
            # piece_to_id answers unk for unknown pieces; fall back on the model's own ids.
            if found == sp.unk_id() and content != sp.id_to_piece(sp.unk_id()):
                found = {"pad": sp.pad_id(), "eos": sp.eos_id(), "unk": sp.unk_id()}[kind]
            if found < 0:
                raise ModelFolderError(f"tokenizer in {folder} has no {kind} token {content!r}")
            ids[kind] = found

        def encode_batch(texts: list[str]) -> list[list[int]]:
            return sp.encode(texts, out_type=int)

        return cls(encode_batch, ids["pad"], ids["eos"], ids["unk"], sp.get_piece_size(), folder, clean_text)

    clean = staticmethod(clean)

    def encode(self, text: str, max_length: int = 512) -> list[int]:
        """One prompt's ids without padding: (cleaned) text tokens, cut to fit, then EOS."""
        return self._finish(self._encode_batch([self._prepare(text)])[0], max_length)

    def __call__(self, texts: Sequence[str], max_length: int = 512) -> tuple[Tensor, Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1 (room for EOS), got {max_length}")
        rows = [self._finish(ids, max_length) for ids in self._encode_batch([self._prepare(t) for t in texts])]
        ids = torch.full((len(rows), max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), max_length), dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[b, : len(row)] = 1
        return ids, mask

    def _prepare(self, text: str) -> str:
        return clean(text) if self.clean_text else text

    def _finish(self, ids: list[int], max_length: int) -> list[int]:
        # Truncation keeps room for the EOS that is always appended (HF T5 semantics).
        return list(ids[: max_length - 1]) + [self.eos_id]
