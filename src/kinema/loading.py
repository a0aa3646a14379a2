"""Model folders: layout detection, inspection without loading, config inference, loading.

Two layouts are understood (spec section 8):

- official (Wan-AI/Wan2.2-*): the DiT `config.json` + `diffusion_pytorch_model*.safetensors`
  at the root (TI2V) or in `high_noise_model/` + `low_noise_model/` (A14B), the umT5 encoder
  `models_t5_umt5-xxl-enc-bf16.pth`, the tokenizer `google/umt5-xxl/` and `Wan2.x_VAE.pth`;
- diffusers (Wan-AI/Wan2.2-*-Diffusers): `model_index.json`, `transformer/`, optional
  `transformer_2/`, `vae/`, `text_encoder/` (transformers UMT5EncoderModel), `tokenizer/`.

Component names: `transformer` (the single DiT, or the high-noise expert), `transformer_2`
(the low-noise expert), `vae`, `text_encoder`.

Inspection reads only safetensors headers and memory-mapped `.pth` files, so it is cheap for
full-size checkpoints. Loading builds every module on the meta device and assigns the
memory-mapped tensors (cast when a dtype is asked for), so peak host memory stays near one
copy of the weights. `.pth` files are only ever read with `torch.load(weights_only=True)`:
a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from . import keymaps
from .config import (
    PRESETS,
    WAN21_LATENT_MEAN,
    WAN21_LATENT_STD,
    WAN22_LATENT_MEAN,
    WAN22_LATENT_STD,
    DiTConfig,
    ModelSpec,
    SamplingDefaults,
    T5Config,
    VAEConfig,
)
from . import limits
from .errors import CheckpointError, ModelFolderError

Layout = Literal["official", "diffusers"]
COMPONENTS = ("transformer", "transformer_2", "vae", "text_encoder")

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"
VAE_FILES = ("Wan2.2_VAE.pth", "Wan2.1_VAE.pth", "Wan2.2_VAE.safetensors", "Wan2.1_VAE.safetensors")
DIT_WEIGHTS = "diffusion_pytorch_model"
HF_WEIGHTS = "model"
OVERRIDES_FILE = "kinema.json"

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16" for torch.bfloat16, etc."""
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------------------------------
# Reading checkpoint files
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# Largest tensor a header may declare: 2**36 elements (64 Gi) is 4x the largest Wan matrix
# times the layer count; a claimed 1e12-element tensor is a corrupt or hostile header.
MAX_TENSOR_NUMEL = 1 << 36


def _require_regular(file: Path, what: str = "file") -> int:
    """The size of `file`, a regular file (a FIFO or device would block or stream forever)."""
    try:
        st = os.stat(file)
    except FileNotFoundError:
        raise ModelFolderError(f"missing {what} {file}") from None
    except OSError as exc:
        raise ModelFolderError(f"cannot read {what} {file}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ModelFolderError(f"{what} {file} is not a regular file")
    return st.st_size


def _json_loads(raw: bytes | str) -> Any:
    try:
        return json.loads(raw)
    except RecursionError:  # a deeply nested document: hostile, never a real header
        raise ValueError("JSON nested too deeply") from None


def _header_entry(entry: Any) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of one safetensors header entry; ValueError when malformed."""
    if not isinstance(entry, dict):
        raise ValueError("entry is not an object")
    dtype = _ST_DTYPES.get(entry.get("dtype"))
    if dtype is None:
        raise ValueError(f"unknown dtype {entry.get('dtype')!r}")
    shape_raw, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape_raw, list) or not isinstance(offsets, list) or len(offsets) != 2:
        raise ValueError("shape and data_offsets must be lists")
    values = [*shape_raw, *offsets]
    if not all(type(v) is int and v >= 0 for v in values):  # bools, floats, inf, negatives
        raise ValueError("shape and offsets must be whole numbers >= 0")
    shape = tuple(shape_raw)
    if math.prod(shape) > MAX_TENSOR_NUMEL:
        raise ValueError(f"shape {list(shape)} is implausibly large")
    begin, end = offsets
    if end < begin:
        raise ValueError(f"data offsets [{begin}, {end}] are inverted")
    if end - begin != math.prod(shape) * dtype.itemsize:
        raise ValueError(f"data offsets [{begin}, {end}] do not hold a {dtype_name(dtype)} tensor of shape {list(shape)}")
    return dtype, shape, begin, end


def read_safetensors_header(file: Path) -> dict[str, TensorMeta]:
    """Tensor names, shapes and dtypes from a safetensors header, checking the file is complete
    and every entry is consistent (offsets in range and matching shape x dtype)."""
    size = _require_regular(file, "checkpoint file")
    try:
        with open(file, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = _json_loads(fh.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ModelFolderError(f"corrupt or truncated safetensors file {file}: {exc}") from None
    if not isinstance(header, dict):
        raise ModelFolderError(f"corrupt safetensors file {file}: header is not a JSON object")
    out: dict[str, TensorMeta] = {}
    data_size = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, begin, end = _header_entry(entry)
        except ValueError as exc:
            raise ModelFolderError(f"corrupt safetensors file {file}: bad header entry for {name!r}: {exc}") from None
        if end > data_size:
            raise ModelFolderError(
                f"truncated safetensors file {file}: tensor {name!r} ends at byte {end} "
                f"but only {data_size} data bytes are present"
            )
        out[name] = TensorMeta(shape, dtype, file)
    return out


def load_pth(file: Path) -> dict[str, Tensor]:
    """A `.pth` state dict through `torch.load(weights_only=True, mmap=True)`.

    weights_only refuses any pickle that would construct arbitrary objects (a checkpoint must
    not be able to run code); mmap keeps the tensors on disk until they are used.
    """
    _require_regular(file, "checkpoint file")
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            # Legacy (non-zip) serialization cannot be memory-mapped; still weights-only.
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every library error becomes one clear line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc) or "Weights only" in str(exc):
            reason = "refused: the file is not a plain tensor state dict (weights_only load failed)"
        raise ModelFolderError(f"cannot read checkpoint {file}: {reason[:300]}") from None
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ModelFolderError(f"checkpoint {file} is not a state dict of tensors")
    return dict(state)


def _meta_of_pth(file: Path) -> dict[str, TensorMeta]:
    return {k: TensorMeta(tuple(v.shape), v.dtype, file) for k, v in load_pth(file).items()}


def _read_index(index: Path) -> dict[str, str]:
    try:
        _require_regular(index, "index file")
        data = _json_loads(index.read_text(encoding="utf-8"))
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError):
        raise ModelFolderError(f"corrupt index file {index}: expected a JSON object with a 'weight_map'") from None
    return {str(k): str(v) for k, v in weight_map.items()}


def _safetensors_files(folder: Path, stem: str, what: str) -> list[Path]:
    """The weight files of a diffusers/transformers model folder (sharded via the index or not)."""
    index = folder / f"{stem}.safetensors.index.json"
    single = folder / f"{stem}.safetensors"
    if index.is_file():
        shards = sorted(set(_read_index(index).values()))
        for shard in shards:
            if not (folder / shard).is_file():
                raise ModelFolderError(f"index {index} names a missing shard {shard}")
        return [folder / s for s in shards]
    if single.is_file():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    raise ModelFolderError(
        f"missing {what} weights in {folder}: expected {single.name} or {index.name} with its shards"
    )


def _read_json(file: Path) -> dict[str, Any]:
    size = _require_regular(file)
    if size > 16_000_000:  # configs are a few KB; refuse to parse a huge one
        raise ModelFolderError(f"{file} is {size} bytes: too large for a config file")
    try:
        data = _json_loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelFolderError(f"corrupt JSON file {file}: {exc}") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"corrupt JSON file {file}: expected an object")
    return data


# ---------------------------------------------------------------------------------------
# Inspection
# ---------------------------------------------------------------------------------------


@dataclass
class ComponentInfo:
    """One component of a model folder, described from file headers only."""

    name: str
    files: list[Path]
    layout: Layout
    # Official key -> (shape, stored dtype, file); for transformers T5 the tied embedding
    # appears once, so `params` counts each stored parameter once.
    tensors: dict[str, TensorMeta]
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def dtypes(self) -> dict[str, int]:
        """Stored dtype name -> number of parameters in that dtype."""
        out: dict[str, int] = {}
        for t in self.tensors.values():
            out[dtype_name(t.dtype)] = out.get(dtype_name(t.dtype), 0) + t.numel
        return out

    @property
    def dtype(self) -> str:
        """The stored dtype holding most parameters."""
        counts = self.dtypes
        return max(counts, key=counts.get) if counts else "float32"

    @property
    def nbytes(self) -> int:
        return sum(t.numel * t.dtype.itemsize for t in self.tensors.values())

    def shape(self, key: str) -> tuple[int, ...] | None:
        meta = self.tensors.get(key)
        return None if meta is None else meta.shape


@dataclass
class FolderInfo:
    """What a model folder holds, without its weights loaded."""

    path: Path
    layout: Layout
    components: dict[str, ComponentInfo]
    tokenizer_dir: Path | None
    spec: ModelSpec
    preset: str  # the closest built-in preset (source of the sampling defaults)
    model_index: dict[str, Any] = field(default_factory=dict)
    overrides: dict[str, Any] = field(default_factory=dict)  # kinema.json

    @property
    def two_experts(self) -> bool:
        return "transformer_2" in self.components


def _official_keys(name: str, metas: dict[str, TensorMeta], version: str | None) -> dict[str, TensorMeta]:
    """Rename a component's tensor table to official keys (identity when already official)."""
    if name.startswith("transformer"):
        return keymaps.dit_state_to_official(metas)
    if name == "vae":
        return keymaps.vae_state_to_official(metas, version or _vae_version_from_keys(metas))
    return keymaps.t5_state_to_official(metas)


def _vae_version_from_keys(metas: Mapping[str, Any]) -> str:
    """2.2 when the encoder stem takes 12 (patchified) channels or the stages are nested."""
    for key in ("encoder.conv1.weight", "encoder.conv_in.weight"):
        if key in metas and len(metas[key].shape) == 5:
            return "2.2" if metas[key].shape[1] == 12 else "2.1"
    if any(".downsamples.0.downsamples." in k or ".downsampler." in k for k in metas):
        return "2.2"
    return "2.1"


def _component_from_safetensors(name: str, folder: Path, stem: str, layout: Layout,
                                config: dict[str, Any], version: str | None = None) -> ComponentInfo:
    files = _safetensors_files(folder, stem, name)
    index_file = folder / f"{stem}.safetensors.index.json"
    metas: dict[str, TensorMeta] = {}
    for file in files:
        metas.update(read_safetensors_header(file))
    if index_file.is_file():
        for key, shard in _read_index(index_file).items():
            meta = metas.get(key)
            if meta is None or meta.file.name != shard:
                raise ModelFolderError(f"index {index_file} maps {key!r} to {shard}, which does not hold it")
    return ComponentInfo(name, files, layout, _official_keys(name, metas, version), config)


def _component_from_file(name: str, file: Path, layout: Layout, config: dict[str, Any],
                         version: str | None = None) -> ComponentInfo:
    metas = read_safetensors_header(file) if file.suffix == ".safetensors" else _meta_of_pth(file)
    return ComponentInfo(name, [file], layout, _official_keys(name, metas, version), config)


def detect_layout(path: Path) -> Layout:
    """"official" or "diffusers"; ModelFolderError when the folder holds no Wan model."""
    path = Path(path)
    if not path.exists():
        raise ModelFolderError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise ModelFolderError(f"{path} is not a folder")
    if (path / "model_index.json").is_file():
        return "diffusers"
    if (path / "config.json").is_file() or (path / "high_noise_model" / "config.json").is_file():
        return "official"
    raise ModelFolderError(
        f"no Wan model found in {path}: expected config.json or high_noise_model/ "
        f"(official layout) or model_index.json (diffusers layout)"
    )


def _require_dir(folder: Path, what: str) -> Path:
    if not folder.is_dir():
        raise ModelFolderError(f"missing {what} folder {folder}")
    return folder


def _inspect_official(path: Path) -> tuple[dict[str, ComponentInfo], Path | None]:
    comps: dict[str, ComponentInfo] = {}
    high = path / "high_noise_model"
    if high.is_dir():
        low = _require_dir(path / "low_noise_model", "low-noise expert (low_noise_model/)")
        comps["transformer"] = _component_from_safetensors(
            "transformer", high, DIT_WEIGHTS, "official", _read_json(high / "config.json"))
        comps["transformer_2"] = _component_from_safetensors(
            "transformer_2", low, DIT_WEIGHTS, "official", _read_json(low / "config.json"))
    else:
        comps["transformer"] = _component_from_safetensors(
            "transformer", path, DIT_WEIGHTS, "official", _read_json(path / "config.json"))

    vae_files = [path / n for n in VAE_FILES if (path / n).is_file()]
    if not vae_files:
        raise ModelFolderError(f"missing VAE in {path}: expected Wan2.2_VAE.pth or Wan2.1_VAE.pth")
    if len(vae_files) > 1:  # pick the one whose latent channels match the DiT output
        out_dim = _dit_out_dim(comps["transformer"])
        wanted = "Wan2.2" if out_dim == 48 else "Wan2.1"
        vae_files = [f for f in vae_files if f.name.startswith(wanted)] or vae_files
    vae_file = vae_files[0]
    name_version = "2.2" if vae_file.name.startswith("Wan2.2") else "2.1"
    comps["vae"] = _component_from_file("vae", vae_file, "official", {"file_version": name_version})

    t5 = path / T5_FILE
    if not t5.is_file():
        alternatives = sorted(path.glob("models_t5_*.pth")) + sorted(path.glob("models_t5_*.safetensors"))
        if not alternatives:
            raise ModelFolderError(f"missing text encoder in {path}: expected {T5_FILE}")
        t5 = alternatives[0]
    comps["text_encoder"] = _component_from_file("text_encoder", t5, "official", {})
    tok = path / TOKENIZER_DIR
    return comps, tok if tok.is_dir() else None


def _inspect_diffusers(path: Path, index: dict[str, Any]) -> tuple[dict[str, ComponentInfo], Path | None]:
    comps: dict[str, ComponentInfo] = {}

    def listed(name: str) -> bool:
        entry = index.get(name)
        return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None

    for name in ("transformer", "transformer_2"):
        folder = path / name
        if name == "transformer_2" and not (listed(name) or folder.is_dir()):
            continue
        _require_dir(folder, name)
        comps[name] = _component_from_safetensors(
            name, folder, DIT_WEIGHTS, "diffusers", _read_json(folder / "config.json"))

    vae_dir = _require_dir(path / "vae", "vae")
    vae_cfg = _read_json(vae_dir / "config.json")
    version = "2.2" if vae_cfg.get("is_residual") or vae_cfg.get("patch_size") else "2.1"
    comps["vae"] = _component_from_safetensors("vae", vae_dir, DIT_WEIGHTS, "diffusers", vae_cfg, version)

    te_dir = _require_dir(path / "text_encoder", "text_encoder")
    comps["text_encoder"] = _component_from_safetensors(
        "text_encoder", te_dir, HF_WEIGHTS, "diffusers", _read_json(te_dir / "config.json"))
    tok = path / "tokenizer"
    return comps, tok if tok.is_dir() else None


def inspect_folder(path: str | Path) -> FolderInfo:
    """Describe a model folder (layout, files, stored dtypes, exact parameter counts, configs)
    from file headers only; raises ModelFolderError for a missing or incomplete folder."""
    path = Path(path).expanduser()
    layout = detect_layout(path)
    index: dict[str, Any] = {}
    if layout == "official":
        comps, tok = _inspect_official(path)
    else:
        index = _read_json(path / "model_index.json")
        comps, tok = _inspect_diffusers(path, index)
    overrides = _read_json(path / OVERRIDES_FILE) if os.path.lexists(path / OVERRIDES_FILE) else {}
    spec, preset_name = infer_spec(comps, index, overrides)
    return FolderInfo(path, layout, comps, tok, spec, preset_name, index, overrides)


# ---------------------------------------------------------------------------------------
# Config inference
# ---------------------------------------------------------------------------------------


def _need(comp: ComponentInfo, key: str, ndim: int) -> tuple[int, ...]:
    shape = comp.shape(key)
    if shape is None or len(shape) != ndim:
        file = comp.files[0] if comp.files else comp.name
        found = "missing" if shape is None else f"shape {list(shape)}"
        raise CheckpointError(f"{comp.name} in {file}: key {key!r} is {found}, expected a {ndim}-D tensor")
    return shape


def _dit_out_dim(comp: ComponentInfo) -> int:
    head = _need(comp, "head.head.weight", 2)
    patch = _need(comp, "patch_embedding.weight", 5)
    return head[0] // math.prod(patch[2:])


def _block_count(comp: ComponentInfo) -> int:
    indices = {int(k.split(".")[1]) for k in comp.tensors if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    return max(indices) + 1 if indices else 0


def _cross_check(comp: ComponentInfo, what: str, from_config: Any, from_shapes: Any) -> None:
    if from_config is not None and from_config != from_shapes:
        cfg_file = comp.files[0].parent / "config.json"
        raise CheckpointError(
            f"{cfg_file} says {what} = {from_config} but the weights in {comp.files[0].parent} "
            f"have {what} = {from_shapes}"
        )


def infer_dit_config(comp: ComponentInfo, model_type: str | None = None) -> DiTConfig:
    """DiTConfig from config.json (official or diffusers fields) checked against tensor shapes."""
    cfg = comp.config
    patch = _need(comp, "patch_embedding.weight", 5)
    dim, in_dim, patch_size = patch[0], patch[1], tuple(patch[2:])
    text = _need(comp, "text_embedding.0.weight", 2)
    time = _need(comp, "time_embedding.0.weight", 2)
    ffn = _need(comp, "blocks.0.ffn.0.weight", 2)
    out_dim = _dit_out_dim(comp)
    num_layers = _block_count(comp)
    diffusers = "num_attention_heads" in cfg or "in_channels" in cfg
    source = str(comp.files[0].parent / "config.json") if comp.files else comp.name
    if diffusers:
        heads = _cfg_number(cfg, "num_attention_heads", source, limits.MAX_HEADS)
        head_dim = _cfg_number(cfg, "attention_head_dim", source, limits.MAX_WIDTH)
        _cross_check(comp, "dim", heads * head_dim if heads and head_dim else None, dim)
        _cross_check(comp, "in_channels", cfg.get("in_channels"), in_dim)
        _cross_check(comp, "out_channels", cfg.get("out_channels"), out_dim)
        _cross_check(comp, "text_dim", cfg.get("text_dim"), text[1])
    else:
        heads = _cfg_number(cfg, "num_heads", source, limits.MAX_HEADS)
        _cross_check(comp, "dim", cfg.get("dim"), dim)
        _cross_check(comp, "in_dim", cfg.get("in_dim"), in_dim)
        _cross_check(comp, "out_dim", cfg.get("out_dim"), out_dim)
    _cross_check(comp, "ffn_dim", cfg.get("ffn_dim"), ffn[0])
    _cross_check(comp, "num_layers", cfg.get("num_layers"), num_layers)
    _cross_check(comp, "freq_dim", cfg.get("freq_dim"), time[1])
    if heads is None:
        heads = max(1, dim // 128)  # Wan2.x always uses 128-wide heads
    if dim % heads:
        raise CheckpointError(f"{comp.files[0].parent}: dim {dim} is not divisible by {heads} heads")
    mtype = cfg.get("model_type") if not diffusers else None
    if mtype not in ("t2v", "i2v", "ti2v"):
        mtype = model_type or ("i2v" if in_dim != out_dim else "t2v")
    text_len = _cfg_number(cfg, "text_len", source, limits.MAX_TEXT_LEN)
    eps = cfg.get("eps", 1e-6)
    limits.real(eps, source, "eps", 0.0, 0.1, low_open=True, error=CheckpointError)
    out = DiTConfig(
        model_type=mtype,
        patch_size=patch_size,  # type: ignore[arg-type]
        text_len=512 if text_len is None else text_len,
        in_dim=in_dim,
        dim=dim,
        ffn_dim=ffn[0],
        freq_dim=time[1],
        text_dim=text[1],
        out_dim=out_dim,
        num_heads=int(heads),
        num_layers=num_layers,
        qk_norm=comp.shape("blocks.0.self_attn.norm_q.weight") is not None or num_layers == 0,
        cross_attn_norm=comp.shape("blocks.0.norm3.weight") is not None or num_layers == 0,
        eps=float(eps),
    )
    limits.check_dit(out, source)
    return out


def _cfg_number(cfg: Mapping[str, Any], key: str, source: str, high: int) -> int | None:
    """An optional whole-number config field in [1, high]; None when absent."""
    value = cfg.get(key)
    return None if value is None else limits.whole(value, source, key, 1, high, CheckpointError)


def infer_vae_config(comp: ComponentInfo) -> VAEConfig:
    """VAEConfig from tensor shapes (+ diffusers vae/config.json for latents_mean/std)."""
    conv_in = _need(comp, "encoder.conv1.weight", 5)
    version = "2.2" if conv_in[1] == 12 else "2.1"
    named = comp.config.get("file_version")
    if named and named != version:
        raise CheckpointError(
            f"{comp.files[0]} is named as a Wan{named} VAE but its encoder takes {conv_in[1]} channels "
            f"(Wan{version})"
        )
    z_dim = _need(comp, "conv2.weight", 5)[0]
    dim = conv_in[0]
    dec_dim = _need(comp, "decoder.head.0.gamma", 4)[0] if version == "2.2" else None
    cfg = comp.config
    mean = cfg.get("latents_mean")
    std = cfg.get("latents_std")
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == z_dim):
        if z_dim == 48:
            mean, std = WAN22_LATENT_MEAN, WAN22_LATENT_STD
        elif z_dim == 16:
            mean, std = WAN21_LATENT_MEAN, WAN21_LATENT_STD
        else:  # an unknown latent space: identity normalization
            mean, std = (0.0,) * z_dim, (1.0,) * z_dim
    source = str(comp.files[0].parent / "config.json") if comp.files else comp.name
    kwargs: dict[str, Any] = {}
    try:
        if "dim_mult" in cfg:
            kwargs["dim_mult"] = tuple(cfg["dim_mult"])
        if "num_res_blocks" in cfg:
            kwargs["num_res_blocks"] = limits.whole(cfg["num_res_blocks"], source, "num_res_blocks", 1, 16,
                                                    CheckpointError)
        if "temperal_downsample" in cfg:
            kwargs["temperal_downsample"] = tuple(bool(b) for b in cfg["temperal_downsample"])
        out = VAEConfig(version=version, dim=dim, dec_dim=dec_dim, z_dim=z_dim,
                        latents_mean=tuple(float(m) for m in mean), latents_std=tuple(float(s) for s in std),
                        **kwargs)
    except (TypeError, ValueError, OverflowError) as exc:
        raise CheckpointError(f"{source}: bad VAE field ({exc})") from None
    limits.check_vae(out, source)
    return out


def infer_t5_config(comp: ComponentInfo) -> T5Config:
    """T5Config from tensor shapes (+ transformers config.json for eps / max distance)."""
    vocab, dim = _need(comp, "token_embedding.weight", 2)
    dim_attn = _need(comp, "blocks.0.attn.q.weight", 2)[0]
    dim_ffn = _need(comp, "blocks.0.ffn.fc1.weight", 2)[0]
    shared = comp.shape("pos_embedding.embedding.weight")
    pos = shared or _need(comp, "blocks.0.pos_embedding.embedding.weight", 2)
    cfg = comp.config
    source = str(comp.files[0].parent / "config.json") if comp.files else comp.name
    max_dist = cfg.get("relative_attention_max_distance", 128)
    eps = cfg.get("layer_norm_epsilon", 1e-6)
    limits.whole(max_dist, source, "relative_attention_max_distance", 1, 1 << 20, CheckpointError)
    limits.real(eps, source, "layer_norm_epsilon", 0.0, 0.1, low_open=True, error=CheckpointError)
    out = T5Config(
        vocab=vocab, dim=dim, dim_attn=dim_attn, dim_ffn=dim_ffn, num_heads=pos[1],
        num_layers=_block_count(comp), num_buckets=pos[0], max_dist=int(max_dist),
        shared_pos=shared is not None, eps=float(eps),
    )
    limits.check_t5(out, source)
    return out


def closest_preset(dit: DiTConfig, vae: VAEConfig, two_experts: bool) -> str:
    """The built-in preset whose family (task, experts, VAE) matches, nearest in width."""
    family = [
        name for name, p in PRESETS.items()
        if p.dit.model_type == dit.model_type and p.two_experts == two_experts and p.vae.version == vae.version
    ]
    if not family:
        family = [name for name, p in PRESETS.items() if p.dit.model_type == dit.model_type] or list(PRESETS)
    return min(family, key=lambda n: abs(PRESETS[n].dit.dim - dit.dim))


def _apply_overrides(defaults: SamplingDefaults, overrides: Mapping[str, Any], source: str) -> SamplingDefaults:
    allowed = {f.name for f in fields(SamplingDefaults)}
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        if key not in allowed:
            raise ModelFolderError(f"{source}: unknown default {key!r} (known: {', '.join(sorted(allowed))})")
        try:
            if key == "size":
                value = tuple(int(v) for v in value)
                if len(value) != 2:
                    raise ValueError("size must be [width, height]")
            elif key == "supported_sizes":
                value = tuple(tuple(int(v) for v in s) for s in value)
            elif key == "guidance":
                value = tuple(float(v) for v in value) if isinstance(value, list) else float(value)
            elif key in ("frames", "fps", "steps"):
                value = int(value)
            elif key == "image_first_scale":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError("image_first_scale must be a whole number >= 1")
            elif key in ("shift", "boundary") and value is not None:
                value = float(value)
            elif key in ("sampler", "negative_prompt"):
                value = str(value)
            elif key == "image_first":
                if not isinstance(value, bool):
                    raise ValueError("image_first must be true or false")
        except (TypeError, ValueError, OverflowError) as exc:
            raise ModelFolderError(f"{source}: bad value for {key!r}: {value!r} ({exc})") from None
        changes[key] = value
    out = replace(defaults, **changes)
    limits.check_defaults(out, source)
    return out


def infer_spec(comps: Mapping[str, ComponentInfo], model_index: Mapping[str, Any],
               overrides: Mapping[str, Any]) -> tuple[ModelSpec, str]:
    """ModelSpec of a folder plus the name of the preset its sampling defaults came from."""
    vae = infer_vae_config(comps["vae"])
    two = "transformer_2" in comps
    hint = "ti2v" if vae.version == "2.2" else None
    if model_index.get("expand_timesteps"):
        hint = "ti2v"
    dit = infer_dit_config(comps["transformer"], hint)
    if two:
        dit2 = infer_dit_config(comps["transformer_2"], dit.model_type)
        if replace(dit2, model_type=dit.model_type) != dit:
            raise CheckpointError(
                f"the two experts differ in architecture: {comps['transformer'].files[0].parent} "
                f"vs {comps['transformer_2'].files[0].parent}"
            )
    t5 = infer_t5_config(comps["text_encoder"])
    # The DiT pads/truncates text to its own text_len: longer prompts are cut by the tokenizer.
    t5 = replace(t5, text_len=min(t5.text_len, dit.text_len))
    if t5.dim != dit.text_dim:
        raise CheckpointError(
            f"text encoder width {t5.dim} ({comps['text_encoder'].files[0]}) does not match the DiT "
            f"text_dim {dit.text_dim}"
        )
    preset_name = closest_preset(dit, vae, two)
    defaults = PRESETS[preset_name].defaults
    if model_index.get("boundary_ratio") is not None:
        defaults = replace(defaults, boundary=float(model_index["boundary_ratio"]))
    name = preset_name if PRESETS[preset_name].dit == dit else f"custom-{dit.model_type}"
    if overrides:
        if "defaults" in overrides:
            if not isinstance(overrides["defaults"], Mapping):
                raise ModelFolderError(f"{OVERRIDES_FILE}: 'defaults' must be an object")
            defaults = _apply_overrides(defaults, overrides["defaults"], OVERRIDES_FILE)
        name = str(overrides.get("name", name))
    spec = ModelSpec(name=name, dit=dit, vae=vae, t5=t5, two_experts=two, defaults=defaults)
    return spec, preset_name


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    """The modules of a model folder, ready for inference (eval mode, no grads)."""

    spec: ModelSpec
    layout: Layout
    transformer: Any | None  # kinema.models.dit.WanModel (single DiT or high-noise expert)
    transformer_2: Any | None  # low-noise expert of a two-expert model
    vae: Any | None  # kinema.models.vae.WanVAE
    text_encoder: Any | None  # kinema.models.t5.TextEncoder (tokenizer included)
    info: FolderInfo


def read_state(comp: ComponentInfo) -> dict[str, Tensor]:
    """The component's tensors under official keys, memory-mapped (no copy yet)."""
    from safetensors import safe_open

    raw: dict[str, Tensor] = {}
    for file in comp.files:
        if file.suffix == ".safetensors":
            try:
                with safe_open(str(file), framework="pt", device="cpu") as fh:
                    for key in fh.keys():
                        raw[key] = fh.get_tensor(key)
            except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
                raise ModelFolderError(f"corrupt or truncated safetensors file {file}: {str(exc)[:200]}") from None
        else:
            raw.update(load_pth(file))
    if comp.name.startswith("transformer"):
        return keymaps.dit_state_to_official(raw)
    if comp.name == "vae":
        return keymaps.vae_state_to_official(raw, _vae_version_from_keys(raw))
    return keymaps.t5_state_to_official(raw)


def _few(keys: Iterable[str], n: int = 4) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(repr(k) for k in keys[:n]) + more


def check_state(module: torch.nn.Module, state: Mapping[str, Tensor], comp: ComponentInfo) -> None:
    """Compare a checkpoint with a (meta) module: missing/unexpected keys and shapes, one line."""
    expected = module.state_dict()
    where = comp.files[0] if len(comp.files) == 1 else comp.files[0].parent
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    if missing:
        raise CheckpointError(f"{comp.name} checkpoint {where} is missing keys: {_few(missing)}")
    if unexpected:
        raise CheckpointError(f"{comp.name} checkpoint {where} has unexpected keys: {_few(unexpected)}")
    for key, ref in expected.items():
        got = tuple(state[key].shape)
        if got != tuple(ref.shape):
            file = comp.tensors[key].file if key in comp.tensors else where
            raise CheckpointError(
                f"{comp.name} checkpoint {file}: key {key!r} has shape {list(got)}, expected {list(ref.shape)}"
            )


def _assign(module: torch.nn.Module, state: dict[str, Tensor], comp: ComponentInfo,
            dtype_of: Any, device: torch.device) -> None:
    """Cast/move each tensor (one at a time, so at most one extra copy lives) and assign."""
    check_state(module, state, comp)
    for key in list(state):
        t = state[key]
        target = dtype_of(key, t) if t.is_floating_point() else t.dtype
        if t.dtype != target or t.device != device:
            state[key] = t.to(device=device, dtype=target)
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # should not happen after check_state; still one clear line
        raise CheckpointError(f"{comp.name}: cannot load {comp.files[0]}: {str(exc).splitlines()[0]}") from None


def _build_dit(cfg: DiTConfig, comp: ComponentInfo, dtype: torch.dtype | None, device: torch.device):
    from .models.dit import WanModel, keep_fp32

    with torch.device("meta"):
        model = WanModel(cfg)
    state = read_state(comp)
    half = dtype in (torch.float16, torch.bfloat16)

    def dtype_of(key: str, t: Tensor) -> torch.dtype:
        if dtype is None:
            return torch.float32  # official: the DiT is float32 in memory unless converted
        return torch.float32 if half and keep_fp32(key) else dtype

    _assign(model, state, comp, dtype_of, device)
    return model.eval().requires_grad_(False)


def _build_vae(cfg: VAEConfig, comp: ComponentInfo, dtype: torch.dtype | None, device: torch.device):
    from .models.vae import WanVAE

    with torch.device("meta"):
        model = WanVAE(cfg)
    state = read_state(comp)
    _assign(model, state, comp, lambda k, t: dtype or torch.float32, device)
    return model.eval().requires_grad_(False)


def _build_text_encoder(cfg: T5Config, comp: ComponentInfo, tokenizer_dir: Path | None,
                        dtype: torch.dtype | None, device: torch.device):
    from .models.t5 import T5Encoder, TextEncoder
    from .tokenizer import UMT5Tokenizer

    if tokenizer_dir is None:
        where = comp.files[0].parent
        raise ModelFolderError(f"missing tokenizer in {where}: expected {TOKENIZER_DIR}/ or tokenizer/")
    tokenizer = UMT5Tokenizer.from_dir(tokenizer_dir)
    with torch.device("meta"):
        model = T5Encoder(cfg)
    state = read_state(comp)
    _assign(model, state, comp, lambda k, t: dtype or t.dtype, device)
    if tokenizer.vocab_size > cfg.vocab:
        raise ModelFolderError(
            f"tokenizer {tokenizer_dir} has {tokenizer.vocab_size} tokens but the text encoder "
            f"{comp.files[0]} only {cfg.vocab}"
        )
    return TextEncoder(tokenizer, model.eval().requires_grad_(False), text_len=cfg.text_len)


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    components: Iterable[str] | None = None,
    vae_dtype: torch.dtype | None = None,
    text_encoder_dtype: torch.dtype | None = None,
) -> LoadedModel:
    """Load a model folder (official or diffusers layout).

    dtype: the DiT weights' dtype (None: float32, as the official code keeps them; bfloat16 /
    float16 keep the small float32-computed parts, see `models.dit.keep_fp32`, in float32).
    vae_dtype: default float32. text_encoder_dtype: default `dtype` when given, else the stored
    dtype (bfloat16 for the official file). components: subset of
    {"transformer", "transformer_2", "vae", "text_encoder"} (default: all the folder has).
    """
    info = inspect_folder(path)
    wanted = set(info.components) if components is None else set(components)
    unknown = wanted - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown component(s) {sorted(unknown)}; choose from {', '.join(COMPONENTS)}")
    device = torch.device(device)
    spec = info.spec
    comps = info.components
    transformer = transformer_2 = vae = text_encoder = None
    if "transformer" in wanted:
        transformer = _build_dit(spec.dit, comps["transformer"], dtype, device)
    if "transformer_2" in wanted and "transformer_2" in comps:
        transformer_2 = _build_dit(spec.dit, comps["transformer_2"], dtype, device)
    if "vae" in wanted:
        vae = _build_vae(spec.vae, comps["vae"], vae_dtype, device)
    if "text_encoder" in wanted:
        te_dtype = text_encoder_dtype or dtype
        text_encoder = _build_text_encoder(spec.t5, comps["text_encoder"], info.tokenizer_dir, te_dtype, device)
    return LoadedModel(spec, info.layout, transformer, transformer_2, vae, text_encoder, info)
