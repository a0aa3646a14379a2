"""Prompt policy: a check run before any generation.

A policy is any callable `policy(prompt: str) -> str | None` that returns a refusal reason, or
None to allow the prompt (see `PromptPolicy`). kinema always applies its built-in minimum rule
(no sexual content involving minors); on top of it, one extra policy can be plugged in:

* `KINEMA_PROMPT_POLICY=package.module:callable` (the callable is the policy, or a class / factory
  taking no arguments that returns one), or
* an installed package exposing an entry point in the group `kinema.prompt_policy`
  (e.g. in pyproject.toml: `[project.entry-points."kinema.prompt_policy"] mine = "pkg.mod:policy"`),
* or, from Python, `check_prompt(prompt, policy=my_policy)`.

The default policy is keyword based: it normalises the prompt (Unicode NFKC, accents, case,
leetspeak digits and symbols, letters split by punctuation or spaces such as "s e x" or
"n.u.d.e") and refuses when a term about minors occurs together with a sexual term, or when a
term that alone denotes sexualised minors occurs. It covers English plus basic Spanish,
French, German, Italian, Portuguese, Dutch, Russian, Chinese and Japanese terms. It is a
floor, not a classifier: deployments should plug in a stronger policy.
"""

from __future__ import annotations

import os
import re
import unicodedata
from typing import Callable, Protocol, runtime_checkable

from ..errors import KinemaError


class PolicyError(KinemaError):
    """The prompt policy refused a request."""


@runtime_checkable
class PromptPolicy(Protocol):
    """Returns a short refusal reason, or None when the prompt is allowed."""

    def __call__(self, prompt: str) -> str | None: ...


# Terms are matched on whole words of the normalised text (see `normalize`). Multi-word
# terms are written with single spaces.
_MINOR_TERMS = [
    # en
    "child", "children", "childs", "kid", "kids", "kiddie", "kiddy", "minor", "minors", "underage", "under age",
    "preteen", "preteens", "pre teen", "tween", "tweens", "teen", "teens", "teenage", "teenager", "teenagers",
    "young girl", "young girls", "young boy", "young boys", "little girl", "little girls", "little boy", "little boys",
    "schoolgirl", "schoolgirls", "schoolboy", "schoolboys", "school girl", "school boy", "toddler", "toddlers",
    "infant", "infants", "juvenile", "prepubescent", "pubescent", "loli", "lolis", "shota", "shotas",
    "elementary school", "middle school", "little daughter", "little son", "baby girl", "baby boy",
    "grade schooler", "kindergarten", "kindergartner",
    # es / pt / it / fr / de / nl
    "nino", "nina", "ninos", "ninas", "menor", "menores", "adolescente", "adolescentes", "crianca", "criancas",
    "menina", "menino", "bambino", "bambina", "bambini", "ragazzina", "ragazzino", "minorenne", "enfant", "enfants",
    "fillette", "gamin", "gamine", "mineur", "mineure", "kind", "kinder", "madchen", "junge", "minderjahrige",
    "minderjahriger", "meisje", "jongen", "minderjarige",
    # ru (transliterated forms are caught by the latin list; cyrillic here)
    "ребенок", "ребёнок", "дети", "девочка", "мальчик", "несовершеннолетний", "несовершеннолетняя", "школьница",
]
_MINOR_SUBSTRINGS = ["儿童", "幼女", "少女", "萝莉", "未成年", "小学生", "中学生", "子供", "児童", "幼児", "ロリ", "ショタ"]
_SEXUAL_TERMS = [
    # en
    "sex", "sexy", "sexual", "sexually", "sexualized", "sexualised", "porn", "porno", "pornographic", "pornography",
    "nude", "nudes", "nudity", "naked", "nsfw", "erotic", "erotica", "explicit", "xxx", "hentai", "lewd", "undress",
    "undressed", "undressing", "topless", "bottomless", "strip", "stripping", "striptease", "lingerie", "orgasm",
    "masturbate", "masturbating", "masturbation", "intercourse", "fuck", "fucking", "fucked", "rape", "raped",
    "molest", "molested", "molesting", "genital", "genitals", "penis", "vagina", "pussy", "dick", "cock", "breasts",
    "boobs", "tits", "nipples", "blowjob", "handjob", "cum", "seductive", "sensual", "fetish", "bdsm", "bondage",
    "onlyfans", "camgirl", "aroused", "horny", "spread legs", "without clothes", "no clothes", "panties",
    # es / pt / it / fr / de / nl
    "sexo", "sexual", "desnudo", "desnuda", "desnudos", "desnudas", "desnuda", "pornografia", "erotico", "erotica",
    "nu", "nue", "nus", "nues", "sexe", "sexuel", "sexuelle", "pornographique", "nudo", "nuda", "nudi", "nackt",
    "nackte", "nackter", "sexuell", "porno", "pelado", "pelada", "naakt", "seks", "tette", "culo",
    # ru
    "секс", "порно", "голая", "голый", "голые", "эротика", "обнаженная", "обнажённая",
]
_SEXUAL_SUBSTRINGS = ["色情", "裸", "性交", "做爱", "エロ", "ヌード", "セックス", "猥褻", "性的"]
# Terms that on their own denote sexualised minors.
_ALONE_TERMS = ["child porn", "child pornography", "kiddie porn", "kiddy porn", "cp porn", "csam", "jailbait", "pedo",
                "pedophile", "pedophilia", "paedophile", "paedophilia", "lolicon", "shotacon", "preteen porn",
                "pthc", "underage porn", "underage sex", "teen porn"]
_AGE_RE = re.compile(
    r"\b(\d{1,2})\s*(?:y|yo|y o|yr|yrs|year old|years old|year|years|ans|anos|jahre|jahrig|jaar|anni|лет|года)\b"
)

_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i", "+": "t", "|": "l"})


def normalize(text: str) -> str:
    """Lower-case, accent-free, leetspeak-decoded text with single spaces between words; letters
    spelled out one by one ("s.e.x", "n u d e") are joined back into words."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c))
    text = text.replace("ß", "ss")
    # Decode leetspeak only inside words (digits alone, e.g. ages, stay digits).
    text = re.sub(r"\w*[a-z][\w@$!+|]*", lambda m: m.group(0).translate(_LEET), text)
    text = re.sub(r"[@$!+|](?=[a-z])|(?<=[a-z])[@$!+|]", lambda m: m.group(0).translate(_LEET), text)
    words = re.findall(r"\w+", text)
    # Join runs of single letters ("s e x" -> "sex").
    out: list[str] = []
    run: list[str] = []
    for w in words + [""]:
        if len(w) == 1 and w.isalpha():
            run.append(w)
            continue
        if run:
            out.append("".join(run))
            run = []
        if w:
            out.append(w)
    return " ".join(out)


def _has_any(norm: str, squashed: str, terms: list[str]) -> bool:
    padded = f" {norm} "
    for term in terms:
        if f" {term} " in padded:
            return True
        # Words glued together or split oddly ("childporn", "ch ild"): match multi-letter terms
        # inside the space-free text only when they are long enough to be unambiguous.
        if len(term.replace(" ", "")) >= 7 and term.replace(" ", "") in squashed:
            return True
    return False


def default_policy(prompt: str) -> str | None:
    """kinema's built-in minimum rule: no sexual content involving minors."""
    norm = normalize(prompt)
    squashed = norm.replace(" ", "")
    raw = unicodedata.normalize("NFKC", prompt).lower()
    plain = " ".join(re.findall(r"\w+", "".join(c for c in unicodedata.normalize("NFKD", raw) if not unicodedata.combining(c))))
    reason = "sexual content involving minors is not allowed"
    if _has_any(norm, squashed, _ALONE_TERMS):
        return reason
    minor = _has_any(norm, squashed, _MINOR_TERMS) or any(s in raw for s in _MINOR_SUBSTRINGS)
    minor = minor or any(int(m.group(1)) < 18 for m in _AGE_RE.finditer(plain))
    sexual = _has_any(norm, squashed, _SEXUAL_TERMS) or any(s in raw for s in _SEXUAL_SUBSTRINGS)
    return reason if minor and sexual else None


def _load(spec: str) -> PromptPolicy:
    import importlib

    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise PolicyError(f"KINEMA_PROMPT_POLICY must look like 'package.module:callable', got {spec!r}")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise PolicyError(f"cannot load prompt policy {spec!r}: {exc}") from None
    if isinstance(obj, type):
        obj = obj()
    if not callable(obj):
        raise PolicyError(f"prompt policy {spec!r} is not callable")
    return obj


def configured_policy() -> PromptPolicy | None:
    """The extra policy named by `KINEMA_PROMPT_POLICY` or the `kinema.prompt_policy` entry points."""
    spec = os.environ.get("KINEMA_PROMPT_POLICY", "").strip()
    if spec:
        return _load(spec)
    from importlib.metadata import entry_points

    eps = list(entry_points(group="kinema.prompt_policy"))
    if not eps:
        return None
    if len(eps) > 1:
        names = ", ".join(sorted(ep.name for ep in eps))
        raise PolicyError(f"several kinema.prompt_policy entry points are installed ({names}); pick one with KINEMA_PROMPT_POLICY")
    obj = eps[0].load()
    return obj() if isinstance(obj, type) else obj


def check_prompt(prompt: str, policy: PromptPolicy | Callable[[str], str | None] | None = None) -> None:
    """Raise `PolicyError` when the built-in rule or the plugged-in policy refuses `prompt`.

    `policy=None` uses the configured policy (environment / entry point), if any."""
    for check in (default_policy, policy if policy is not None else configured_policy()):
        if check is None:
            continue
        reason = check(prompt)
        if reason:
            name = "default" if check is default_policy else getattr(check, "__name__", type(check).__name__)
            raise PolicyError(f"prompt refused by the {name} content policy: {reason}")
