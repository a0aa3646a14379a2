"""Putting LoRAs on a model's DiT(s) and taking them off again.

`LoraManager` holds the DiT(s) of one loaded model (one, or the high- and low-noise experts)
and the set of LoRAs now applied. `apply(loras)` reads and checks the new set, then takes the
previous one off and puts the new one on, so one loaded pipeline can switch LoRAs between
requests; a set that fails its checks leaves the applied one in place, and asking for the set
already applied does nothing.

Two ways to apply a low-rank delta:

- merge (default): ``W <- W + strength · scale · up @ down``, computed in float32 and rounded
  once to W's dtype (several LoRAs on one weight are summed first). Full deltas (``.diff``,
  ``.diff_b``, ``.diff_m``) are always merged. With ``restorable=True`` the original values of
  every touched parameter are copied to the CPU first, in their own dtype, and copied back by
  `restore()`: bit-exact, unlike subtracting the delta again (rounding). The price is one copy
  of what the set touches: a LoRA on every block Linear of an A14B expert touches 14.05 G
  parameters, 26.2 GiB in bf16 per expert; the bias / norm / modulation deltas of the distill
  LoRAs are 19 MiB. The copies live only while the set is applied. A process that makes one
  video (the CLI) passes ``restorable=False`` and keeps none.
- side branch (``mode="side"``, and always for Linear layers whose weight is not a plain float
  tensor, e.g. quantized ones): the weight is left alone and a forward hook adds
  ``strength · scale · up(down(x))`` to the layer's output. Nothing is copied (the factors of a
  rank-64 LoRA on an A14B expert are 0.3 G parameters) and switching is exact by construction;
  it costs two thin matmuls per layer (+2.5 % FLOPs for a 5120x5120 Linear at rank 64). Layers
  the DiT computes with `F.linear` on their weight (the float32 time MLP and head) do not run
  hooks, so their deltas are merged in either mode.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError, LoraError
from ..models.dit import keep_fp32
from .formats import Delta, ModelIndex, check_lora_file, detect_format, match_lora, read_lora

TARGETS = ("both", "high", "low")
MODES = ("merge", "side")


class LoraWarning(UserWarning):
    """Some keys of a LoRA file have no place in the model (they are skipped)."""


# ---------------------------------------------------------------------------------------------
# what the user asks for


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA to apply: a `.safetensors` file, its strength and, for two-expert models, which
    expert(s). `strength` is one number, or a (high-noise, low-noise) pair for the two experts;
    `target` "high" / "low" puts it on one expert only (Lightning ships one file per expert)."""

    path: str | Path
    strength: float | tuple[float, float] = 1.0
    target: str = "both"

    def strengths(self, experts: int) -> tuple[float | None, ...]:
        """Strength per expert (None: not applied to that expert), checked for `experts` DiTs."""
        if self.target not in TARGETS:
            raise InputError(f"LoRA target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        pair = isinstance(self.strength, (tuple, list))
        values = tuple(self.strength) if pair else (self.strength,)
        if len(values) not in (1, 2):
            raise InputError(f"LoRA strength must be one number or a (high, low) pair, got {self.strength!r}")
        out = []
        for v in values:
            try:
                f = float(v)
            except (TypeError, ValueError):
                raise InputError(f"LoRA strength must be a number, got {v!r}") from None
            if not math.isfinite(f):
                raise InputError(f"LoRA strength must be finite, got {v!r}")
            out.append(f)
        if experts == 1:
            if pair or self.target != "both":
                raise InputError(
                    f"{Path(self.path).name}: per-expert LoRA strengths or targets need a two-expert model"
                )
            return (out[0],)
        high, low = (out[0], out[0]) if len(out) == 1 else (out[0], out[1])
        if self.target == "high":
            return (high, None)
        if self.target == "low":
            return (None, low)
        return (high, low)

    @property
    def record_strength(self) -> float | dict[str, float]:
        """A number, or {"high": h, "low": l} (an object, not a list: the C2PA manifest's CBOR
        turns lists of numbers into byte strings)."""
        s = self.strength
        return {"high": float(s[0]), "low": float(s[1])} if isinstance(s, (tuple, list)) else float(s)


def parse_lora_arg(text: str, target: str = "both") -> LoraSpec:
    """``FILE``, ``FILE:STRENGTH`` or ``FILE:HIGH,LOW`` (the CLI's ``--lora`` value). A colon
    whose tail is not numbers belongs to the path (``C:\\loras\\x.safetensors``)."""
    text = str(text)
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            values = tuple(float(v) for v in tail.split(","))
        except ValueError:
            values = ()
        if len(values) == 1:
            return LoraSpec(path, values[0], target)
        if len(values) == 2:
            return LoraSpec(path, values, target)
        if values or "," in tail:
            raise InputError(f"--lora {text}: strength must be one number or HIGH,LOW")
    return LoraSpec(text, 1.0, target)


def as_spec(item: LoraSpec | str | Path | tuple) -> LoraSpec:
    """Python API convenience: a spec, a path, "FILE:STRENGTH" text or (path, strength[, target])."""
    if isinstance(item, LoraSpec):
        return item
    if isinstance(item, Path):
        return LoraSpec(item)
    if isinstance(item, str):
        return parse_lora_arg(item)
    if isinstance(item, tuple) and 1 <= len(item) <= 3:
        return LoraSpec(*item)
    raise InputError(f"a LoRA is a path, 'FILE:STRENGTH' or a LoraSpec, got {item!r}")


def resolve_loras(loras: Sequence[Any] | None = None, lora_high: Sequence[Any] | None = None,
                  lora_low: Sequence[Any] | None = None, *, experts: int) -> tuple[LoraSpec, ...]:
    """The request's LoRAs as specs, checked without reading the weights: each file exists and
    is safetensors, strengths are numbers, per-expert ones only for `experts` == 2. `loras`
    items: a LoraSpec, a path, "FILE[:STRENGTH|:HIGH,LOW]" or (path, strength[, target]);
    `lora_high` / `lora_low`: the same aimed at one expert (the CLI's --lora-high / --lora-low)."""
    specs: list[LoraSpec] = []
    for items, target in ((loras, None), (lora_high, "high"), (lora_low, "low")):
        if isinstance(items, (str, Path, LoraSpec)):
            items = [items]
        for item in items or ():
            spec = as_spec(item) if target is None or not isinstance(item, str) else parse_lora_arg(item, target)
            if target is not None and spec.target != target:
                spec = LoraSpec(spec.path, spec.strength, target)
            spec.strengths(experts)
            check_lora_file(spec.path)
            specs.append(spec)
    return tuple(specs)


# ---------------------------------------------------------------------------------------------
# what was applied


@dataclass(frozen=True)
class AppliedLora:
    """One file as applied to the model: what matched per expert, what was skipped."""

    name: str
    sha256: str
    format: str
    spec: LoraSpec
    strengths: tuple[float | None, ...]  # per expert
    merged: tuple[tuple[str, ...], ...]  # per expert: parameters changed in place
    side: tuple[tuple[str, ...], ...]  # per expert: weights given a side branch
    unmatched: tuple[str, ...]  # file keys with no place in the model

    @property
    def matched(self) -> int:
        """Parameters changed (the largest count over the experts it is applied to)."""
        return max(len(m) + len(s) for m, s in zip(self.merged, self.side))

    def record(self) -> dict[str, Any]:
        """The entry for the sidecar and the C2PA manifest."""
        return {
            "file": self.name, "sha256": self.sha256, "strength": self.spec.record_strength,
            "target": self.spec.target, "format": self.format,
            "mode": "side" if any(self.side) and not any(self.merged) else
                    ("merge+side" if any(self.side) else "merge"),
            "matched": self.matched, "unmatched": len(self.unmatched),
        }


@dataclass(frozen=True)
class LoraReport:
    loras: tuple[AppliedLora, ...]
    originals_bytes: int  # CPU bytes held to restore the merged parameters

    def records(self) -> list[dict[str, Any]]:
        return [a.record() for a in self.loras]


# ---------------------------------------------------------------------------------------------
# the side branch


class _SideBranch:
    """Forward hook adding sum_i up_i(down_i(x)) (strength and scale folded into up_i) or
    x @ full_i^T to a Linear-like layer's output. Factors are kept on the CPU in float32 and
    copied to the input's device and dtype on first use there."""

    def __init__(self, terms: list[tuple[Tensor | None, Tensor]]):
        self.terms = terms  # (up [out, r] or None, down [r, in] / full [out, in])
        self._cache: dict[tuple[torch.device, torch.dtype], list[tuple[Tensor | None, Tensor]]] = {}

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        x = args[0]
        dtype = x.dtype if x.dtype.is_floating_point else torch.float32
        key = (x.device, dtype)
        terms = self._cache.get(key)
        if terms is None:
            terms = [(None if u is None else u.to(x.device, dtype), d.to(x.device, dtype)) for u, d in self.terms]
            self._cache = {key: terms}  # one device at a time: offload moves layers back and forth
        xin = x.to(dtype)
        extra = None
        for up, down in terms:
            y = F.linear(xin, down) if up is None else F.linear(F.linear(xin, down), up)
            extra = y if extra is None else extra + y
        return output + extra.to(output.dtype)


def _plain_float(p: Any) -> bool:
    return (isinstance(p, nn.Parameter) and type(p.data) is Tensor and p.dtype in
            (torch.float32, torch.float16, torch.bfloat16, torch.float64))


# ---------------------------------------------------------------------------------------------
# the manager


class LoraManager:
    """The LoRAs on the DiT(s) of one loaded model. `models[0]` is the single DiT or the
    high-noise expert, `models[1]` the low-noise expert (the pipeline's order; a None second
    entry, a one-DiT pipeline's `transformer_2`, is dropped)."""

    def __init__(self, models: Sequence[nn.Module | None], *, restorable: bool = True,
                 compute_device: torch.device | str | None = None):
        """`compute_device`: where merge deltas are computed (None: where each weight lives).
        An offloaded model lives on the CPU; merging there costs a matmul per weight on the
        CPU, so a pipeline passes its GPU and each weight makes the round trip instead."""
        models = [m for m in models if m is not None]
        if not 1 <= len(models) <= 2:
            raise ValueError("one DiT or two experts")
        self.models = list(models)
        self.restorable = restorable
        self.compute_device = None if compute_device is None else torch.device(compute_device)
        self._originals: list[dict[str, Tensor]] = [{} for _ in self.models]
        self._hooks: list[Any] = []
        self._dirty = False  # merged without originals: cannot be taken off
        self._signature: tuple | None = None
        self.report = LoraReport((), 0)

    # -- state ----------------------------------------------------------------------------------

    @property
    def active(self) -> tuple[AppliedLora, ...]:
        return self.report.loras

    def records(self) -> list[dict[str, Any]]:
        return self.report.records()

    def originals_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in self._originals for t in d.values())

    def restore(self) -> None:
        """Take every LoRA off: merged parameters get their original values back (bit-exact),
        side branches are removed."""
        if self._dirty:
            raise RuntimeError("LoRAs were merged with restorable=False; reload the model to take them off")
        with torch.no_grad():
            for model, originals in zip(self.models, self._originals):
                for name, value in originals.items():
                    model.get_parameter(name).data.copy_(value)
                originals.clear()
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._signature = None
        self.report = LoraReport((), 0)

    # -- applying -------------------------------------------------------------------------------

    def apply(self, loras: Sequence[LoraSpec | str | Path], *, mode: str = "merge") -> LoraReport:
        """Make `loras` the applied set (an empty list takes all off). LoraError (one line) for
        a file that is not safetensors, matches nothing, or has a shape that does not fit;
        a `LoraWarning` with the count of keys that have no place in the model."""
        if mode not in MODES:
            raise InputError(f"LoRA mode must be one of {', '.join(MODES)}, got {mode!r}")
        specs = [as_spec(x) for x in loras]
        strengths = [s.strengths(len(self.models)) for s in specs]  # checks before any work
        signature = (mode, tuple(_file_id(s.path) + (st, s.target) for s, st in zip(specs, strengths)))
        if signature == self._signature:
            return self.report
        if self._dirty:
            raise RuntimeError("LoRAs were merged with restorable=False; reload the model to change them")

        # Everything that can fail (reading, matching, shapes, where each delta goes) happens
        # before any weight changes, so a bad set leaves the applied one in place.
        files = [read_lora(s.path) for s in specs]
        indexes = [ModelIndex.of(m) for m in self.models]
        plans: list[list[list[Delta]]] = []  # [lora][expert] -> deltas
        applied_unmatched: list[tuple[str, ...]] = []
        for spec, lora, per_expert in zip(specs, files, strengths):
            rows: list[list[Delta]] = []
            unmatched: set[str] | None = None
            for k, index in enumerate(indexes):
                if per_expert[k] is None:
                    rows.append([])
                    continue
                found = match_lora(lora, index)
                rows.append(list(found.deltas))
                unmatched = set(found.unmatched) if unmatched is None else unmatched & set(found.unmatched)
            if not any(rows):
                raise LoraError(f"nothing in LoRA {lora.name} matches this model (keys such as "
                                f"{', '.join(list(lora.tensors)[:3])})")
            plans.append(rows)
            applied_unmatched.append(tuple(sorted(unmatched or ())))
        routes = [self._route(k, plans, strengths, mode) for k in range(len(self.models))]

        for lora, skipped in zip(files, applied_unmatched):
            if skipped:
                warnings.warn(f"LoRA {lora.name}: {len(skipped)} of {len(lora.tensors)} keys have no place in "
                              f"this model and are skipped (e.g. {skipped[0]})", LoraWarning, stacklevel=2)
        self.restore()
        for k, (to_merge, branches, _, _) in enumerate(routes):
            self._merge(k, to_merge)
            for module_name, terms in branches.items():
                hook = _SideBranch(terms)
                self._hooks.append(self.models[k].get_submodule(module_name).register_forward_hook(hook))
        applied = tuple(
            AppliedLora(name=lora.name, sha256=lora.sha256, format=detect_format(lora.tensors), spec=spec,
                        strengths=st, merged=tuple(r[2][i] for r in routes), side=tuple(r[3][i] for r in routes),
                        unmatched=applied_unmatched[i])
            for i, (spec, lora, st) in enumerate(zip(specs, files, strengths))
        )
        self._signature = signature if specs else None
        self.report = LoraReport(applied, self.originals_bytes())
        return self.report

    def _route(self, k: int, plans: list[list[list[Delta]]], strengths: list[tuple[float | None, ...]], mode: str):
        """Where each delta of expert k goes: (param -> [(delta, strength)] to merge, module ->
        side-branch terms, per LoRA the merged names, per LoRA the side-branch names)."""
        model = self.models[k]
        params = dict(model.named_parameters())
        to_merge: dict[str, list[tuple[Delta, float]]] = {}
        branches: dict[str, list[tuple[Tensor | None, Tensor]]] = {}
        merged: list[tuple[str, ...]] = []
        side: list[tuple[str, ...]] = []
        for i, rows in enumerate(plans):
            coef = strengths[i][k]
            m_names: list[str] = []
            s_names: list[str] = []
            for delta in rows[k] if coef is not None else ():
                p = params.get(delta.param)
                quantized = p is None or not _plain_float(p)
                if quantized and not delta.param.endswith(".weight"):
                    raise LoraError(f"cannot apply a LoRA to {delta.param}: it is not a float tensor")
                if quantized or (mode == "side" and self._hookable(model, delta)):
                    branches.setdefault(delta.param.rsplit(".", 1)[0], []).append(_side_term(delta, coef))
                    s_names.append(delta.param)
                else:
                    to_merge.setdefault(delta.param, []).append((delta, coef))
                    m_names.append(delta.param)
            merged.append(tuple(m_names))
            side.append(tuple(s_names))
        return to_merge, branches, merged, side

    def _merge(self, k: int, to_merge: dict[str, list[tuple[Delta, float]]]) -> None:
        # One parameter at a time, so the float32 temporaries are one weight's worth (not the
        # whole model's: 56 GB for an A14B expert).
        params = dict(self.models[k].named_parameters())
        with torch.no_grad():
            for name, terms in to_merge.items():
                p = params[name]
                shape = tuple(p.shape)
                dev = self.compute_device or p.device
                d = terms[0][0].tensor(shape, device=dev, strength=terms[0][1])
                for delta, coef in terms[1:]:
                    d += delta.tensor(shape, device=dev, strength=coef)
                if self.restorable:
                    self._originals[k].setdefault(name, p.detach().to("cpu", copy=True))
                else:
                    self._dirty = True
                p.data.copy_(d.add_(p.detach().to(dev)))  # float32 sum, one rounding to p's dtype
                del d

    @staticmethod
    def _hookable(model: nn.Module, delta: Delta) -> bool:
        """Whether a side branch sees this layer's calls: a Linear called as a module (not the
        float32 parts that the DiT runs through F.linear on the weight)."""
        if not delta.param.endswith(".weight") or keep_fp32(delta.param):
            return False
        return isinstance(model.get_submodule(delta.param.rsplit(".", 1)[0]), nn.Linear)


def _side_term(delta: Delta, coef: float) -> tuple[Tensor | None, Tensor]:
    if delta.full is not None:
        if delta.full.dim() != 2:
            raise LoraError(f"cannot apply a full delta to {delta.param} as a side branch")
        return None, delta.full.float() * coef
    if delta.down.dim() != 2:
        raise LoraError(f"cannot apply a conv LoRA to {delta.param} as a side branch")
    return delta.up.float() * (coef * delta.scale), delta.down.float()


def _file_id(path: str | Path) -> tuple:
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        return (str(p),)
    return (str(p.resolve()), st.st_size, st.st_mtime_ns)


__all__ = ["AppliedLora", "LoraManager", "LoraReport", "LoraSpec", "LoraWarning", "as_spec", "parse_lora_arg",
           "resolve_loras"]
