"""Reading LoRA files and matching their keys to a Wan DiT's parameters.

One LoRA file becomes a list of `Delta`s, each aimed at one parameter of the model by its
official name (`blocks.0.self_attn.q.weight`). The formats people share for Wan:

=====================  ===================================================================
ComfyUI / lightx2v     ``diffusion_model.blocks.0.self_attn.q.lora_down.weight`` / ``lora_up``
                       / ``.alpha``, plus full deltas ``.diff`` (weight), ``.diff_b`` (bias)
                       and ``.diff_m`` (the block's ``modulation`` table)
PEFT                   ``blocks.0.self_attn.q.lora_A.weight`` / ``lora_B`` (also under
                       ``diffusion_model.``, ``transformer.`` or ``base_model.model.``; the
                       adapter name of a raw PEFT state dict, ``lora_A.default.weight``, too)
musubi / kohya         ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` (module path with
                       ``_`` for ``.``) / ``lora_up`` / ``.alpha``
diffusers              any of the above with diffusers module names (``blocks.0.attn1.to_q``,
                       ``ffn.net.0.proj``, ``proj_out``, ...; mapped by `kinema.keymaps`), and
                       diffusers' ``lora_B.bias`` (its spelling of a bias delta)
=====================  ===================================================================

Scaling, as each format defines it: a low-rank pair adds ``scale · up @ down`` with
``scale = alpha / rank`` when the file stores an ``.alpha`` for the module (kohya, ComfyUI and
diffusers' converter all read it so); otherwise the PEFT ``lora_adapter_metadata`` that diffusers
writes into the safetensors header (fields under ``transformer.``: ``lora_alpha / r``, its
``alpha_pattern`` / ``rank_pattern``, ``lora_alpha / sqrt(r)`` with ``use_rslora``); otherwise 1
(what diffusers assumes for a file with neither). lightx2v's and Wan2.2-Lightning's own merge scripts ignore ``.alpha`` (scale 1);
both readings agree for files whose alpha equals their rank. Full deltas are added as they are.
The user's strength multiplies both.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .. import keymaps
from ..errors import LoraError

# Outer prefixes trainers put before the module path (stripped repeatedly, longest first).
_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "model.")
# kohya / musubi: one prefix, then the module path with "." written as "_".
_KOHYA_PREFIXES = ("lora_unet_", "lora_transformer_")
# (key suffix, role); longest first so ".diff_b" is not read as ".diff".
_SUFFIXES = (
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_B.bias", "bias"),
    (".alpha", "alpha"),
    (".diff_b", "bias"),
    (".diff_m", "modulation"),
    (".diff", "weight"),
)
_PEFT_ADAPTER = re.compile(r"\.lora_([AB])\.[^.]+\.(weight|bias)$")  # lora_A.<adapter>.weight
PEFT_METADATA_KEY = "lora_adapter_metadata"  # where diffusers stores the PEFT config
# Adapters that are not a sum of low-rank and full deltas: refused rather than half applied.
_UNSUPPORTED = (("lora_magnitude_vector", "DoRA"), (".dora_scale", "DoRA"), (".hada_", "LyCORIS LoHa"),
                (".lokr_", "LyCORIS LoKr"), (".lora_mid.", "LyCORIS LoCon (Tucker)"))


@dataclass(frozen=True)
class Delta:
    """A change of one model parameter: ``scale · up @ down`` (low rank) or ``full``."""

    param: str  # official parameter key
    scale: float = 1.0
    up: Tensor | None = None  # [out, r, (1, ...)]
    down: Tensor | None = None  # [r, in, (k, ...)]
    full: Tensor | None = None  # the parameter's shape (or fewer input channels, see `pad_to`)
    keys: tuple[str, ...] = ()  # the file keys it came from

    @property
    def low_rank(self) -> bool:
        return self.full is None

    def tensor(self, shape: tuple[int, ...], device: torch.device | str = "cpu", strength: float = 1.0) -> Tensor:
        """The float32 delta ``strength · scale · up @ down`` (or ``strength · full``) of a
        parameter of `shape`."""
        if self.full is not None:
            d = strength * self.full.to(device=device, dtype=torch.float32)
        else:
            up = self.up.to(device=device, dtype=torch.float32)
            down = self.down.to(device=device, dtype=torch.float32)
            r = down.shape[0]
            # conv LoRAs: up [out, r, 1, 1, 1], down [r, in, kt, kh, kw]
            prod = (up.reshape(up.shape[0], r) @ down.reshape(r, -1)).reshape(up.shape[0], *down.shape[1:])
            d = (strength * self.scale) * prod
        return _pad_in_channels(d, shape)


def _pad_in_channels(d: Tensor, shape: tuple[int, ...]) -> Tensor:
    """A delta with fewer input channels than the parameter (a T2V `patch_embedding` delta on
    the I2V model, whose extra channels carry the image) applies to the leading channels."""
    if tuple(d.shape) == tuple(shape):
        return d
    out = d.new_zeros(shape)
    out[:, : d.shape[1]] = d
    return out


@dataclass(frozen=True)
class LoraFile:
    """A LoRA file as read: its tensors, header metadata and identity."""

    path: Path
    sha256: str
    tensors: dict[str, Tensor]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def check_lora_file(path: str | Path) -> Path:
    """LoraError unless `path` is an existing file that starts like a safetensors file (reads
    9 bytes: cheap enough for request validation)."""
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"LoRA file {path} does not exist")
    with open(path, "rb") as fh:
        head = fh.read(9)
    # safetensors: an 8-byte little-endian header length, then the JSON header ("{...").
    if len(head) < 9 or head[8:9] != b"{":
        raise LoraError(f"LoRA file {path.name} is not a safetensors file (only .safetensors LoRAs are read)")
    return path


def read_lora(path: str | Path) -> LoraFile:
    """Read a LoRA from a `.safetensors` file; anything else is refused (a pickled .pt/.ckpt
    can run code when loaded). LoraError with a one-line message for a missing or bad file."""
    from safetensors import SafetensorError, safe_open

    path = check_lora_file(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise LoraError(f"LoRA file {path.name} is not a readable safetensors file: {exc}") from None
    if not tensors:
        raise LoraError(f"LoRA file {path.name} holds no tensors")
    return LoraFile(path=path, sha256=_sha256(path), tensors=tensors, metadata=metadata)


# ---------------------------------------------------------------------------------------------
# the model side: which names exist and their shapes


@dataclass(frozen=True)
class ModelIndex:
    """What a LoRA can aim at in one DiT: parameter shapes by official key, and the module
    names as kohya (``_`` joined) and diffusers spell them."""

    shapes: dict[str, tuple[int, ...]]
    modules: frozenset[str]
    kohya: dict[str, str]  # "blocks_0_self_attn_q" (official or diffusers) -> "blocks.0.self_attn.q"
    # (also parameters: "blocks_0_modulation" -> "blocks.0.modulation")

    @classmethod
    def of(cls, model: torch.nn.Module) -> "ModelIndex":
        shapes = {k: tuple(p.shape) for k, p in model.named_parameters()}
        # Linear-like layers: the logical [out, in] shape, whatever the stored weight looks like
        # (a quantized layer keeps a packed tensor or buffers instead of a float weight; a LoRA
        # still aims at `<layer>.weight` and becomes a side branch).
        for name, mod in model.named_modules():
            if hasattr(mod, "in_features") and hasattr(mod, "out_features"):
                shapes[f"{name}.weight"] = (int(mod.out_features), int(mod.in_features))
        modules = frozenset(k.rsplit(".", 1)[0] for k in shapes if "." in k)
        kohya: dict[str, str] = {k.replace(".", "_"): k for k in shapes}  # a parameter's own delta
        for m in modules:
            kohya[m.replace(".", "_")] = m
            try:
                kohya[keymaps.dit_to_diffusers(m + ".weight").removesuffix(".weight").replace(".", "_")] = m
            except KeyError:
                pass
        return cls(shapes=shapes, modules=modules, kohya=kohya)


def _strip_prefixes(key: str) -> tuple[str, bool]:
    """(module path + suffix, whether it is kohya style)."""
    for p in _KOHYA_PREFIXES:
        if key.startswith(p):
            return key[len(p):], True
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key, False


def _split_suffix(key: str) -> tuple[str, str] | None:
    key = _PEFT_ADAPTER.sub(lambda m: f".lora_{m.group(1)}.{m.group(2)}", key)
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _resolve_module(base: str, kohya: bool, index: ModelIndex) -> str | None:
    """The official module (or parameter) path a LoRA's module name stands for, or None."""
    if kohya:
        return index.kohya.get(base)
    if base in index.modules or base in index.shapes:
        return base
    try:
        official = keymaps.dit_to_official(base + ".weight").removesuffix(".weight")
    except KeyError:
        return None
    return official if official in index.modules else None


def _peft_scale(metadata: Mapping[str, str], module: str, rank: int) -> float:
    """alpha / r from diffusers' PEFT metadata (patterns match the end of the module name)."""
    raw = metadata.get(PEFT_METADATA_KEY)
    if not raw:
        return 1.0
    try:
        cfg = json.loads(raw)
    except ValueError:
        return 1.0
    if not isinstance(cfg, dict):
        return 1.0
    if "lora_alpha" not in cfg:  # diffusers prefixes each field with the component's name
        cfg = {k.split(".", 1)[1]: v for k, v in cfg.items() if k.startswith("transformer.")}
        if "lora_alpha" not in cfg:
            return 1.0

    def pattern(table: Any, default: Any) -> Any:
        for pat, value in (table or {}).items():
            if re.fullmatch(rf"(.*\.)?(?:{pat})", module):
                return value
        return default

    r = pattern(cfg.get("rank_pattern"), cfg.get("r", rank))
    alpha = float(pattern(cfg.get("alpha_pattern"), cfg["lora_alpha"]))
    if cfg.get("use_dora"):
        raise LoraError("DoRA LoRAs (use_dora) are not supported")
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / float(r)


_DIFFUSERS_NAMES = re.compile(r"(^|[._])(attn[12]|condition_embedder|proj_out|ffn[._]net)([._]|$)")


def detect_format(keys) -> str:
    """A name for the record: "kohya", "comfyui", "peft" or "diff" (full deltas only), with
    " (diffusers names)" when the modules are named as in diffusers."""
    keys = list(keys)
    if any(k.startswith(_KOHYA_PREFIXES) for k in keys):
        fmt = "kohya"
    elif any(".lora_down." in k for k in keys):
        fmt = "comfyui"
    elif any(".lora_A." in k for k in keys):
        fmt = "peft"
    else:
        fmt = "diff"
    return fmt + (" (diffusers names)" if any(_DIFFUSERS_NAMES.search(k) for k in keys) else "")


@dataclass(frozen=True)
class Matched:
    """The result of matching one file against one model."""

    deltas: tuple[Delta, ...]
    unmatched: tuple[str, ...]  # file keys with no place in this model


def match_lora(lora: LoraFile, index: ModelIndex) -> Matched:
    """Group the file's keys per module and aim each group at a parameter of the model.

    Keys whose module the model lacks (image-projection keys of a Wan2.1 I2V LoRA, a text
    encoder's keys, ...) or of an unknown kind are returned as unmatched. A matched key whose
    shape cannot fit raises LoraError naming the key.
    """
    for key in lora.tensors:
        for marker, kind in _UNSUPPORTED:
            if marker in key:
                raise LoraError(f"{lora.name}: {key} is a {kind} key; only plain LoRA factors and full deltas are supported")
    groups: dict[str, dict[str, tuple[str, Tensor]]] = {}  # module -> role -> (key, tensor)
    spelled: dict[str, str] = {}  # module -> its name as the file spells it (PEFT patterns)
    unmatched: list[str] = []
    for key, value in lora.tensors.items():
        stripped, kohya = _strip_prefixes(key)
        split = _split_suffix(stripped)
        if split is None:
            unmatched.append(key)
            continue
        base, role = split
        module = _resolve_module(base, kohya, index)
        if module is None:
            unmatched.append(key)
            continue
        slot = groups.setdefault(module, {})
        if role in slot:
            raise LoraError(f"{lora.name}: {key} and {slot[role][0]} both give {role} of {module}")
        slot[role] = (key, value)
        spelled.setdefault(module, base)

    deltas: list[Delta] = []
    for module, slot in groups.items():
        base = spelled[module]
        down, up, alpha = slot.pop("down", None), slot.pop("up", None), slot.pop("alpha", None)
        if (down is None) != (up is None):
            present = down or up
            unmatched.append(present[0])  # half a pair: nothing to apply
            if alpha is not None:
                unmatched.append(alpha[0])
        elif down is not None:
            deltas.append(_low_rank(lora, module, base, down, up, alpha, index))
        elif alpha is not None:
            unmatched.append(alpha[0])
        for role, (key, value) in slot.items():  # full deltas: weight, bias, modulation
            param = module if module in index.shapes else f"{module}.{role}"
            if param not in index.shapes:
                unmatched.append(key)
                continue
            _check_full(lora, key, value, param, index.shapes[param])
            deltas.append(Delta(param=param, full=value, keys=(key,)))
    return Matched(deltas=tuple(deltas), unmatched=tuple(unmatched))


def _low_rank(lora: LoraFile, module: str, base: str, down: tuple[str, Tensor], up: tuple[str, Tensor],
              alpha: tuple[str, Tensor] | None, index: ModelIndex) -> Delta:
    (kd, d), (ku, u) = down, up
    param = f"{module}.weight"
    shape = index.shapes.get(param)
    if shape is None:
        raise LoraError(f"{lora.name}: {kd} aims at {module}, which has no weight")
    rank = d.shape[0] if d.dim() >= 2 else -1
    fits = (
        d.dim() == len(shape) and u.dim() == len(shape) and u.shape[0] == shape[0] and u.shape[1] == rank
        and all(s == 1 for s in u.shape[2:]) and tuple(d.shape[2:]) == tuple(shape[2:])
        and (d.shape[1] == shape[1] or (module == "patch_embedding" and d.shape[1] < shape[1]))
    )
    if not fits:
        raise LoraError(
            f"{lora.name}: {kd} {tuple(d.shape)} / {ku} {tuple(u.shape)} do not fit {param} {shape}"
        )
    if alpha is not None:
        scale = float(alpha[1].float().item()) / rank
    else:
        scale = _peft_scale(lora.metadata, base, rank)
    keys = (kd, ku) + ((alpha[0],) if alpha is not None else ())
    return Delta(param=param, scale=scale, up=u, down=d, keys=keys)


def _check_full(lora: LoraFile, key: str, value: Tensor, param: str, shape: tuple[int, ...]) -> None:
    fits = tuple(value.shape) == tuple(shape) or (
        param == "patch_embedding.weight" and value.dim() == len(shape) and value.shape[0] == shape[0]
        and value.shape[1] < shape[1] and tuple(value.shape[2:]) == tuple(shape[2:])
    )
    if not fits:
        raise LoraError(f"{lora.name}: {key} has shape {tuple(value.shape)}; the model's {param} is {shape}")
