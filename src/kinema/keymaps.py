"""State-dict key renaming between the official Wan checkpoints and the diffusers /
transformers layouts (spec sections 2.12, 3.7, 4.3).

Each component has a pair of per-key functions (official -> other and back) that raise
`KeyError` for a key that does not follow the source layout, plus whole-dict helpers that
keep such keys unchanged so a strict `load_state_dict` reports them as unexpected.

The rules are written as small tables of (official, other) name fragments matched on whole
dot-separated segments, so every rule is used in both directions.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Literal, TypeVar

V = TypeVar("V")
VAEVersion = Literal["2.1", "2.2"]

# ComfyUI-style single-file checkpoints put the whole DiT under this prefix.
COMFY_PREFIX = "model.diffusion_model."


def _swap_prefix(key: str, table: tuple[tuple[str, str], ...], reverse: bool) -> str | None:
    """Replace the first matching whole-segment prefix of `key` (table is (a, b) pairs)."""
    for a, b in table:
        src, dst = (b, a) if reverse else (a, b)
        if key == src:
            return dst
        if key.startswith(src + "."):
            return dst + key[len(src):]
    return None


# ---------------------------------------------------------------------------------------
# DiT: official WanModel <-> diffusers WanTransformer3DModel
# ---------------------------------------------------------------------------------------

# Top-level modules (longest / most specific first).
_DIT_TOP: tuple[tuple[str, str], ...] = (
    ("patch_embedding", "patch_embedding"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.modulation", "scale_shift_table"),
    ("head.head", "proj_out"),
    # Wan2.1 image (CLIP) embedding, kept for completeness.
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
)

# Inside `blocks.{i}`. The official block uses norm1 (self-attn), norm3 (affine, cross-attn),
# norm2 (FFN); diffusers numbers them by order of use, hence the norm2/norm3 swap.
_DIT_BLOCK: tuple[tuple[str, str], ...] = (
    ("modulation", "scale_shift_table"),
    ("norm3", "norm2"),
    ("norm2", "norm3"),
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
)

_DIT_ATTN: tuple[tuple[str, str], ...] = (
    ("self_attn", "attn1"),
    ("cross_attn", "attn2"),
)

_DIT_ATTN_INNER: tuple[tuple[str, str], ...] = (
    ("q", "to_q"),
    ("k", "to_k"),
    ("v", "to_v"),
    ("o", "to_out.0"),
    ("norm_q", "norm_q"),
    ("norm_k", "norm_k"),
    ("k_img", "add_k_proj"),
    ("v_img", "add_v_proj"),
    ("norm_k_img", "norm_added_k"),
)

_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def _dit_rename(key: str, reverse: bool) -> str:
    block = _BLOCK_RE.match(key)
    if block is None:
        new = _swap_prefix(key, _DIT_TOP, reverse)
    else:
        index, rest = block.groups()
        inner = _swap_prefix(rest, _DIT_BLOCK, reverse)
        if inner is None:
            attn = _swap_prefix(rest, _DIT_ATTN, reverse)
            if attn is not None:
                head, tail = attn.split(".", 1)
                sub = _swap_prefix(tail, _DIT_ATTN_INNER, reverse)
                inner = None if sub is None else f"{head}.{sub}"
        new = None if inner is None else f"blocks.{index}.{inner}"
    if new is None:
        side = "diffusers" if reverse else "official"
        raise KeyError(f"not a {side} Wan DiT key: {key!r}")
    return new


def dit_to_diffusers(key: str) -> str:
    """Official `WanModel` key -> diffusers `WanTransformer3DModel` key."""
    if key.startswith(COMFY_PREFIX):
        key = key[len(COMFY_PREFIX):]
    return _dit_rename(key, reverse=False)


def dit_to_official(key: str) -> str:
    """Diffusers `WanTransformer3DModel` key -> official `WanModel` key."""
    if key.startswith(COMFY_PREFIX):  # such files hold official names below the prefix
        official = key[len(COMFY_PREFIX):]
        _dit_rename(official, reverse=False)  # raises KeyError when it is not one
        return official
    return _dit_rename(key, reverse=True)


def is_diffusers_dit(keys) -> bool:
    """True when a DiT key set uses diffusers names (e.g. `condition_embedder.*`, `proj_out.*`)."""
    return any(k.startswith(("condition_embedder.", "proj_out.", "scale_shift_table")) for k in keys)


# ---------------------------------------------------------------------------------------
# VAE: official WanVAE_ <-> diffusers AutoencoderKLWan
# ---------------------------------------------------------------------------------------

_VAE_TOP: tuple[tuple[str, str], ...] = (
    ("conv1", "quant_conv"),
    ("conv2", "post_quant_conv"),
)

# Inside `encoder.` / `decoder.` (before the down/up stages).
_VAE_CODER: tuple[tuple[str, str], ...] = (
    ("conv1", "conv_in"),
    ("head.0", "norm_out"),
    ("head.2", "conv_out"),
    ("middle.0", "mid_block.resnets.0"),
    ("middle.1", "mid_block.attentions.0"),
    ("middle.2", "mid_block.resnets.1"),
)

# Inside a residual block; attention and resample blocks keep their inner names.
_VAE_RES: tuple[tuple[str, str], ...] = (
    ("residual.0", "norm1"),
    ("residual.2", "conv1"),
    ("residual.3", "norm2"),
    ("residual.6", "conv2"),
    ("shortcut", "conv_shortcut"),
)
_VAE_KEEP = ("resample", "time_conv", "norm", "to_qkv", "proj")
_VAE_SAMPLER = ("resample", "time_conv")


def _vae_res_inner(rest: str, reverse: bool) -> str | None:
    new = _swap_prefix(rest, _VAE_RES, reverse)
    if new is not None:
        return new
    return rest if rest.split(".", 1)[0] in _VAE_KEEP else None


def _vae_official_to_diffusers(key: str, version: VAEVersion, num_res_blocks: int) -> str | None:
    top = _swap_prefix(key, _VAE_TOP, False)
    if top is not None:
        return top
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        return None
    fixed = _swap_prefix(rest, _VAE_CODER, False)
    if fixed is not None:
        head, _, tail = fixed.partition(".")
        if fixed.startswith("mid_block."):
            parts = fixed.split(".", 3)  # mid_block, resnets|attentions, n, inner
            inner = _vae_res_inner(parts[3], False) if len(parts) == 4 else None
            return None if inner is None else f"{side}.{'.'.join(parts[:3])}.{inner}"
        return f"{side}.{fixed}"
    stage_name = "downsamples" if side == "encoder" else "upsamples"
    m = re.match(rf"^{stage_name}\.(\d+)\.(.+)$", rest)
    if m is None:
        return None
    k, tail = int(m.group(1)), m.group(2)
    if version == "2.1":
        if side == "encoder":  # flat index kept
            inner = _vae_res_inner(tail, False)
            return None if inner is None else f"encoder.down_blocks.{k}.{inner}"
        group = num_res_blocks + 2  # (num_res_blocks + 1) resnets + one upsampler per stage
        stage, pos = divmod(k, group)
        if pos < group - 1:
            inner = _vae_res_inner(tail, False)
            return None if inner is None else f"decoder.up_blocks.{stage}.resnets.{pos}.{inner}"
        if tail.split(".", 1)[0] not in _VAE_SAMPLER:
            return None
        return f"decoder.up_blocks.{stage}.upsamplers.0.{tail}"
    # Wan2.2: stages hold their own Sequential `downsamples` / `upsamples`.
    m2 = re.match(rf"^{stage_name}\.(\d+)\.(.+)$", tail)
    if m2 is None:
        return None
    j, inner_key = int(m2.group(1)), m2.group(2)
    n_res = num_res_blocks if side == "encoder" else num_res_blocks + 1
    block = "down_blocks" if side == "encoder" else "up_blocks"
    if j < n_res:
        inner = _vae_res_inner(inner_key, False)
        return None if inner is None else f"{side}.{block}.{k}.resnets.{j}.{inner}"
    if j == n_res:
        if inner_key.split(".", 1)[0] not in _VAE_SAMPLER:
            return None
        sampler = "downsampler" if side == "encoder" else "upsampler"
        return f"{side}.{block}.{k}.{sampler}.{inner_key}"
    return None


def _vae_diffusers_to_official(key: str, version: VAEVersion, num_res_blocks: int) -> str | None:
    top = _swap_prefix(key, _VAE_TOP, True)
    if top is not None:
        return top
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        return None
    if rest.startswith("mid_block."):
        parts = rest.split(".", 3)
        if len(parts) < 4:
            return None
        official = _swap_prefix(".".join(parts[:3]), _VAE_CODER, True)
        inner = _vae_res_inner(parts[3], True)
        return None if official is None or inner is None else f"{side}.{official}.{inner}"
    fixed = _swap_prefix(rest, _VAE_CODER, True)
    if fixed is not None:
        return f"{side}.{fixed}"
    block = "down_blocks" if side == "encoder" else "up_blocks"
    stage_name = "downsamples" if side == "encoder" else "upsamples"
    m = re.match(rf"^{block}\.(\d+)\.(.+)$", rest)
    if m is None:
        return None
    k, tail = int(m.group(1)), m.group(2)
    if version == "2.1":
        if side == "encoder":
            inner = _vae_res_inner(tail, True)
            return None if inner is None else f"encoder.downsamples.{k}.{inner}"
        group = num_res_blocks + 2
        r = re.match(r"^resnets\.(\d+)\.(.+)$", tail)
        if r is not None:
            inner = _vae_res_inner(r.group(2), True)
            return None if inner is None else f"decoder.upsamples.{k * group + int(r.group(1))}.{inner}"
        if tail.startswith("upsamplers.0."):
            return f"decoder.upsamples.{k * group + group - 1}.{tail[len('upsamplers.0.'):]}"
        return None
    n_res = num_res_blocks if side == "encoder" else num_res_blocks + 1
    r = re.match(r"^resnets\.(\d+)\.(.+)$", tail)
    if r is not None:
        inner = _vae_res_inner(r.group(2), True)
        return None if inner is None else f"{side}.{stage_name}.{k}.{stage_name}.{r.group(1)}.{inner}"
    sampler = "downsampler." if side == "encoder" else "upsampler."
    if tail.startswith(sampler):
        return f"{side}.{stage_name}.{k}.{stage_name}.{n_res}.{tail[len(sampler):]}"
    return None


def _check_version(version: str) -> None:
    if version not in ("2.1", "2.2"):
        raise ValueError(f"VAE version must be '2.1' or '2.2', got {version!r}")


def vae_to_diffusers(key: str, version: VAEVersion, num_res_blocks: int = 2) -> str:
    """Official `WanVAE_` key -> diffusers `AutoencoderKLWan` key for VAE `version`."""
    _check_version(version)
    new = _vae_official_to_diffusers(key, version, num_res_blocks)
    if new is None:
        raise KeyError(f"not an official Wan{version} VAE key: {key!r}")
    return new


def vae_to_official(key: str, version: VAEVersion, num_res_blocks: int = 2) -> str:
    """Diffusers `AutoencoderKLWan` key -> official `WanVAE_` key for VAE `version`."""
    _check_version(version)
    new = _vae_diffusers_to_official(key, version, num_res_blocks)
    if new is None:
        raise KeyError(f"not a diffusers Wan{version} VAE key: {key!r}")
    return new


def is_diffusers_vae(keys) -> bool:
    """True when a VAE key set uses diffusers names (`quant_conv`, `*.conv_in.*`)."""
    return any(k.startswith(("quant_conv.", "encoder.conv_in.", "decoder.conv_in.")) for k in keys)


# ---------------------------------------------------------------------------------------
# T5: official T5Encoder <-> transformers UMT5EncoderModel
# ---------------------------------------------------------------------------------------

T5_TIED_KEY = "encoder.embed_tokens.weight"  # same tensor as shared.weight in transformers

_T5_TOP: tuple[tuple[str, str], ...] = (
    ("token_embedding", "shared"),
    ("norm", "encoder.final_layer_norm"),
)
_T5_LAYER: tuple[tuple[str, str], ...] = (
    ("norm1", "layer.0.layer_norm"),
    ("attn.q", "layer.0.SelfAttention.q"),
    ("attn.k", "layer.0.SelfAttention.k"),
    ("attn.v", "layer.0.SelfAttention.v"),
    ("attn.o", "layer.0.SelfAttention.o"),
    ("pos_embedding.embedding", "layer.0.SelfAttention.relative_attention_bias"),
    ("norm2", "layer.1.layer_norm"),
    ("ffn.gate.0", "layer.1.DenseReluDense.wi_0"),  # GELU branch
    ("ffn.fc1", "layer.1.DenseReluDense.wi_1"),  # linear branch
    ("ffn.fc2", "layer.1.DenseReluDense.wo"),
)
_T5_OFFICIAL_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
_T5_HF_BLOCK = re.compile(r"^encoder\.block\.(\d+)\.(.+)$")


def t5_to_transformers(key: str) -> str:
    """Official `T5Encoder` key -> transformers `UMT5EncoderModel` key."""
    m = _T5_OFFICIAL_BLOCK.match(key)
    if m is None:
        new = _swap_prefix(key, _T5_TOP, False)
    else:
        inner = _swap_prefix(m.group(2), _T5_LAYER, False)
        new = None if inner is None else f"encoder.block.{m.group(1)}.{inner}"
    if new is None:
        raise KeyError(f"not an official umT5 key: {key!r}")
    return new


def t5_to_official(key: str) -> str:
    """Transformers `UMT5EncoderModel` key -> official `T5Encoder` key.

    `encoder.embed_tokens.weight` is tied to `shared.weight`; both map to `token_embedding.weight`.
    """
    if key == T5_TIED_KEY:
        return "token_embedding.weight"
    m = _T5_HF_BLOCK.match(key)
    if m is None:
        new = _swap_prefix(key, _T5_TOP, True)
    else:
        inner = _swap_prefix(m.group(2), _T5_LAYER, True)
        new = None if inner is None else f"blocks.{m.group(1)}.{inner}"
    if new is None:
        raise KeyError(f"not a transformers umT5 encoder key: {key!r}")
    return new


def is_transformers_t5(keys) -> bool:
    return any(k.startswith(("encoder.block.", "shared.")) or k == T5_TIED_KEY for k in keys)


# ---------------------------------------------------------------------------------------
# Whole-dict helpers
# ---------------------------------------------------------------------------------------


def rename_keys(state: Mapping[str, V], rename: Callable[[str], str]) -> dict[str, V]:
    """Apply `rename` to every key; keys it rejects stay as they are (strict loading then
    reports them). Two keys landing on the same name is an error in the checkpoint."""
    out: dict[str, V] = {}
    for key, value in state.items():
        try:
            new = rename(key)
        except KeyError:
            new = key
        if new in out:
            raise ValueError(f"two checkpoint keys map to {new!r} (one of them is {key!r})")
        out[new] = value
    return out


def dit_state_to_official(state: Mapping[str, V]) -> dict[str, V]:
    """Diffusers (or ComfyUI-prefixed) DiT state dict -> official names; official input passes through."""
    keys = list(state)
    if any(k.startswith(COMFY_PREFIX) for k in keys):
        state = {k[len(COMFY_PREFIX):] if k.startswith(COMFY_PREFIX) else k: v for k, v in state.items()}
        keys = list(state)
    if not is_diffusers_dit(keys):
        return dict(state)
    return rename_keys(state, dit_to_official)


def dit_state_to_diffusers(state: Mapping[str, V]) -> dict[str, V]:
    return rename_keys(state, dit_to_diffusers)


def vae_state_to_official(state: Mapping[str, V], version: VAEVersion, num_res_blocks: int = 2) -> dict[str, V]:
    if not is_diffusers_vae(list(state)):
        return dict(state)
    return rename_keys(state, lambda k: vae_to_official(k, version, num_res_blocks))


def vae_state_to_diffusers(state: Mapping[str, V], version: VAEVersion, num_res_blocks: int = 2) -> dict[str, V]:
    return rename_keys(state, lambda k: vae_to_diffusers(k, version, num_res_blocks))


def t5_state_to_official(state: Mapping[str, V]) -> dict[str, V]:
    """Transformers umT5 state dict -> official names. Of the tied pair, `shared.weight` wins
    and `encoder.embed_tokens.weight` is used only when it is the one present."""
    if not is_transformers_t5(list(state)):
        return dict(state)
    items = {k: v for k, v in state.items() if not (k == T5_TIED_KEY and "shared.weight" in state)}
    return rename_keys(items, t5_to_official)


def t5_state_to_transformers(state: Mapping[str, V], *, tied_copy: bool = False) -> dict[str, V]:
    """Official umT5 state dict -> transformers names (`tied_copy` also writes embed_tokens)."""
    out = rename_keys(state, t5_to_transformers)
    if tied_copy and "shared.weight" in out:
        out[T5_TIED_KEY] = out["shared.weight"]
    return out
