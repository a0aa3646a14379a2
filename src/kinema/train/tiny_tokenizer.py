"""A tiny umT5-style tokenizer folder for tests, trained offline in well under a second.

`make_tiny_tokenizer(folder)` trains a sentencepiece unigram model (pad 0, eos 1, unk 2, no BOS)
on a small built-in English corpus and writes what an HF T5 tokenizer folder holds:
spiece.model, tokenizer.json (the same model expressed for the `tokenizers` library),
tokenizer_config.json and special_tokens_map.json.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

_SUBJECTS = ("a red fox", "the old man", "two cats", "a small boat", "the city", "a dancer",
             "an astronaut", "the forest", "a golden retriever", "waves")
_VERBS = ("runs across", "walks through", "sleeps near", "floats on", "glows above",
          "jumps over", "spins around", "rests beside", "looks at", "crashes into")
_PLACES = ("a snowy field", "the quiet river", "a neon street at night", "the sunny beach",
           "a misty mountain", "the wooden bridge", "a crowded market", "the blue ocean",
           "a green meadow", "the dark sky")
_STYLES = ("cinematic lighting", "slow motion", "high detail", "soft focus", "wide shot",
           "close-up", "4k video", "warm colors")

# Extra words so that the unigram trainer finds a few hundred distinct pieces.
_EXTRA = (
    "quick brown jumping lazy dog", "bright yellow sunflower blooming under clear summer skies",
    "heavy rain falling on empty parking lots", "children laughing while flying colorful kites",
    "ancient castle towers covered with ivy and moss", "robot vacuum exploring kitchen floor",
    "hot air balloons drifting over desert canyons", "jazz musician playing saxophone in smoky bar",
    "frozen waterfall sparkling during winter morning", "busy chef chopping vegetables quickly",
    "vintage train crossing stone viaduct", "butterflies resting on purple lavender",
    "thunderstorm lightning illuminating farmhouse", "penguins waddling along icy shoreline",
    "volcano erupting with glowing orange lava", "teenager skateboarding through graffiti tunnel",
    "grandmother knitting a woolly scarf by fireplace", "zebra herd galloping across savanna",
    "quiet library with dusty bookshelves", "fireworks exploding above harbor",
    "Japanese garden with koi pond and maple trees", "cyberpunk hacker typing on glowing keyboard",
    "elephant spraying water with its trunk", "baker pulling fresh bread from oven",
    "surfer riding enormous turquoise wave", "hummingbird hovering beside red flower",
    "snowboarder carving powder on steep slope", "lighthouse beam sweeping across foggy bay",
)
_SPECIALS = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}


def default_corpus() -> list[str]:
    """Deterministic sentences built from the word lists above (~400 lines)."""
    lines = []
    for i, subject in enumerate(_SUBJECTS):
        for j, verb in enumerate(_VERBS):
            for k in range(4):
                place = _PLACES[(i + j + k) % len(_PLACES)]
                style = _STYLES[(i * 3 + j + k) % len(_STYLES)]
                lines.append(f"{subject.capitalize()} {verb} {place}, {style}.")
    lines += [f"{e.capitalize()}, {_STYLES[i % len(_STYLES)]}." for i, e in enumerate(_EXTRA)]
    lines += [f"Numbers {i}, {i * 7 + 3} and {i * 13 % 97}; (quote) 'yes' \"no\" - ok?!" for i in range(40)]
    return lines


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _proto_field(buf: bytes, number: int) -> bytes | None:
    """First length-delimited field `number` of a protobuf message (enough for ModelProto)."""
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _read_varint(buf, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            size, pos = _read_varint(buf, pos)
            if field == number:
                return buf[pos:pos + size]
            pos += size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    return None


def _precompiled_charsmap(model: bytes) -> bytes:
    # ModelProto.normalizer_spec (field 3) -> NormalizerSpec.precompiled_charsmap (field 2).
    spec = _proto_field(model, 3)
    return (_proto_field(spec, 2) or b"") if spec else b""


def _tokenizer_json(model: bytes) -> str:
    """The sentencepiece unigram model as a `tokenizers` Tokenizer (T5 fast-tokenizer layout)."""
    import sentencepiece as spm
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    sp = spm.SentencePieceProcessor(model_proto=model)
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    tok = Tokenizer(models.Unigram(vocab, unk_id=sp.unk_id(), byte_fallback=False))
    steps = []
    charsmap = _precompiled_charsmap(model)
    if charsmap:  # sentencepiece's own NFKC-style character map
        steps.append(normalizers.Precompiled(charsmap))
    steps.append(normalizers.Replace(Regex(" {2,}"), " "))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    eos = sp.id_to_piece(sp.eos_id())
    tok.post_processor = processors.TemplateProcessing(
        single=f"$A {eos}", pair=f"$A {eos} $B {eos}", special_tokens=[(eos, sp.eos_id())]
    )
    tok.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True, normalized=False)
                            for i in sorted((sp.pad_id(), sp.eos_id(), sp.unk_id()))])
    return tok.to_str(pretty=True)


def make_tiny_tokenizer(folder: Path, vocab_size: int = 256, texts: list[str] | None = None) -> Path:
    """Write a tiny umT5-like tokenizer folder at `folder` and return it."""
    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts if texts is not None else default_corpus()),
        model_writer=buffer,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus may not support the full vocab_size
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        character_coverage=1.0,
        num_threads=1,
        shuffle_input_sentence=False,
        minloglevel=2,
    )
    model = buffer.getvalue()
    (folder / "spiece.model").write_bytes(model)
    (folder / "tokenizer.json").write_text(_tokenizer_json(model), encoding="utf-8")
    config = {"tokenizer_class": "T5Tokenizer", "model_max_length": 512, "extra_ids": 0,
              "additional_special_tokens": [], **_SPECIALS}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(_SPECIALS, indent=1), encoding="utf-8")
    return folder
