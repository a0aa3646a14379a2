"""Running the recipe: the table of steps in their order, the precision they train in, the log.

`kinema train` calls `run_recipe`; `--steps` picks entries of `STEPS` by name.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, fields, is_dataclass, replace
from pathlib import Path
from typing import Callable

import torch

from ..errors import InputError
from . import steps as st
from .recipe import Recipe
from .trainer import OptimConfig

Log = Callable[[str], None]

# name -> step(work, recipe, log, progress, out), in the order they run
STEPS: dict[str, Callable[[Path, Recipe, Log, bool, Path], object]] = {
    "tokenizer": lambda work, recipe, log, progress, out: st.train_tokenizer(work, recipe, log),
    "vae": lambda work, recipe, log, progress, out: st.train_vae(work, recipe, log, progress),
    "latents": lambda work, recipe, log, progress, out: st.encode_latents(work, recipe, log, progress),
    "decoder": lambda work, recipe, log, progress, out: st.tune_decoder(work, recipe, log, progress),
    "dit": lambda work, recipe, log, progress, out: st.train_dit(work, recipe, log, progress),
    "adapt": lambda work, recipe, log, progress, out: st.adapt_decoder(work, recipe, log, progress),
    "export": lambda work, recipe, log, progress, out: st.export(work, recipe, out, log),
}


PRECISIONS = ("auto", "bf16", "fp32")


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX tiles). Elsewhere
    PyTorch emulates it: a DiT step under bf16 autocast took 75 s instead of 4.2 s in float32
    on an AVX2-only AMD EPYC (`benchmarks/train_step_bench.py --part dit`)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)


def _without_bf16(value):
    """`value` with bf16=False in every `OptimConfig` it holds (dataclasses and tuples walked)."""
    if isinstance(value, OptimConfig):
        return replace(value, bf16=False)
    if isinstance(value, tuple):
        return tuple(_without_bf16(v) for v in value)
    if is_dataclass(value) and not isinstance(value, type):
        return replace(value, **{f.name: _without_bf16(getattr(value, f.name)) for f in fields(value)
                                 if f.init})
    return value


def with_precision(recipe: Recipe, precision: str = "auto") -> Recipe:
    """The recipe as it will run: "bf16" keeps its bf16 autocast cycles, "fp32" runs every
    cycle in float32, "auto" keeps bf16 only where the CPU has it in hardware (`native_bf16`).
    Float32 cycles give slightly different weights than the shipped bf16 run, not a worse
    model; emulated bf16 would turn the 12-h recipe into weeks."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "bf16" or (precision == "auto" and native_bf16()):
        return recipe
    return _without_bf16(recipe)


def _logger(work: Path) -> Callable[[str], None]:
    log_file = work / "train.log"

    def log(msg: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        with log_file.open("a", encoding="utf-8") as fh:
            fh.write(line + "\n")
    return log


def run_recipe(work: Path, recipe: Recipe | None = None, steps: tuple[str, ...] = tuple(STEPS),
               out: Path | None = None, threads: int | None = 2, progress: bool = True,
               precision: str = "auto") -> Path:
    """Run the recipe steps in `work`; the exported model folder is `out` (default work/model).
    `precision` picks the autocast of the bf16 cycles (`with_precision`)."""
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise InputError(f"unknown training step(s) {', '.join(map(repr, unknown))}; "
                         f"the steps are {', '.join(STEPS)}")
    asked = recipe or Recipe()
    recipe = with_precision(asked, precision)
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)
    log = _logger(work)
    if recipe != asked:  # with_precision turned bf16 cycles off
        log("bf16 autocast off (" + ("--precision fp32" if precision == "fp32" else
            "this CPU has no AVX512-BF16 or AMX, so bfloat16 would be emulated, ~20x slower") +
            "): every cycle trains in float32; the weights will differ slightly from the shipped ones")
    (work / "recipe.json").write_text(json.dumps(asdict(recipe), indent=1), encoding="utf-8")
    out = Path(out) if out is not None else work / "model"
    for name, run in STEPS.items():
        if name not in steps:
            continue
        start = time.time()
        log(f"== step {name}")
        run(work, recipe, log, progress, out)
        log(f"== step {name} done in {time.time() - start:.0f}s")
    return out


__all__ = ["PRECISIONS", "STEPS", "native_bf16", "run_recipe", "with_precision"]
