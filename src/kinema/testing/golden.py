"""Run golden-vector case files against kinema and compare every output.

Usage: python -m kinema.testing.golden [--json] FILE...

A case file is a safetensors file whose metadata key "case" is a JSON document (kind,
params, tolerance, ...) and whose tensors are prefixed "weights.", "input." and "output.".
Each kind is handled by a runner module in this package that rebuilds the computation from
the case's own metadata (shapes, dims, seeds, settings) and returns the outputs it computed.
"""

from __future__ import annotations

import argparse
import fnmatch
import importlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# kind -> module holding `run(case) -> dict[str, Tensor]`
RUNNERS: dict[str, str] = {
    "dit_t2v": "kinema.testing.golden_dit",
    "dit_ti2v": "kinema.testing.golden_dit",
    "dit_i2v": "kinema.testing.golden_dit",
    "vae21": "kinema.testing.golden_vae",
    "vae22": "kinema.testing.golden_vae",
    "t5": "kinema.testing.golden_t5",
    "sched_unipc": "kinema.testing.golden_sched",
    "sched_dpmpp": "kinema.testing.golden_sched",
    "pipe_t2v_moe": "kinema.testing.golden_pipe",
    "pipe_ti2v": "kinema.testing.golden_pipe",
}


@dataclass
class Case:
    path: Path
    kind: str
    meta: dict[str, Any]
    weights: dict[str, torch.Tensor]
    inputs: dict[str, torch.Tensor]
    outputs: dict[str, torch.Tensor]

    @property
    def params(self) -> dict[str, Any]:
        return self.meta.get("params", {})

    def weights_under(self, prefix: str) -> dict[str, torch.Tensor]:
        """Weights whose key starts with `prefix.` (e.g. "vae"), with the prefix removed."""
        p = prefix + "."
        return {k[len(p):]: v for k, v in self.weights.items() if k.startswith(p)}


def load_case(path: str | Path) -> Case:
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {})["case"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}

    def strip(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}

    kind = meta.get("kind") or meta.get("params", {}).get("kind")
    return Case(path, kind, meta, strip("weights."), strip("input."), strip("output."))


def _tolerance(meta: dict[str, Any], name: str) -> tuple[float, float]:
    tol = meta.get("tolerance", {})
    atol, rtol = float(tol.get("atol", 1e-4)), float(tol.get("rtol", 0.0))
    for pattern, over in (tol.get("overrides") or {}).items():
        if fnmatch.fnmatchcase(name, pattern):
            atol, rtol = float(over.get("atol", atol)), float(over.get("rtol", rtol))
    return atol, rtol


def compare(name: str, got: torch.Tensor | None, ref: torch.Tensor, meta: dict[str, Any]) -> dict[str, Any]:
    """One output's verdict: max abs error, what was allowed, ok."""
    if got is None:
        return {"max_abs_err": None, "allowed": None, "ok": False, "error": "not produced"}
    got = torch.as_tensor(got).detach().cpu()
    if tuple(got.shape) != tuple(ref.shape):
        return {"max_abs_err": None, "allowed": None, "ok": False,
                "error": f"shape {tuple(got.shape)} != reference {tuple(ref.shape)}"}
    if not ref.is_floating_point():
        # Integer outputs (timesteps, expert choice, sizes) must match exactly.
        err = (got.to(torch.float64) - ref.to(torch.float64)).abs().max().item() if ref.numel() else 0.0
        return {"max_abs_err": err, "allowed": 0.0, "ok": err == 0.0}
    atol, rtol = _tolerance(meta, name)
    g, r = got.to(torch.float64), ref.to(torch.float64)
    err = (g - r).abs().max().item() if r.numel() else 0.0
    allowed = atol + rtol * (r.abs().max().item() if r.numel() else 0.0)
    ok = bool(err <= allowed) and bool(torch.isfinite(g).all())
    return {"max_abs_err": err, "allowed": allowed, "ok": ok}


def run_case(path: str | Path) -> dict[str, Any]:
    """Run one case file; returns {"file", "kind", "ok", "outputs": {...}} (and "error")."""
    result: dict[str, Any] = {"file": str(path), "kind": None, "ok": False, "outputs": {}}
    try:
        case = load_case(path)
        result["kind"] = case.kind
        if case.kind not in RUNNERS:
            raise ValueError(f"unknown case kind {case.kind!r}")
        runner = importlib.import_module(RUNNERS[case.kind])
        with torch.no_grad():
            got = runner.run(case)
    except Exception as exc:  # a broken case is reported, not raised: other files still run
        result["error"] = f"{type(exc).__name__}: {exc}"
        return result
    for name, ref in case.outputs.items():
        if name.startswith("debug_"):
            continue
        result["outputs"][name] = compare(name, got.get(name), ref, case.meta)
    result["ok"] = bool(result["outputs"]) and all(o["ok"] for o in result["outputs"].values())
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kinema.testing.golden", description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", help="golden case files (.safetensors)")
    ap.add_argument("--json", action="store_true", help="print a JSON list of results")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    results = [run_case(f) for f in args.files]
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        for r in results:
            print(f"{'PASS' if r['ok'] else 'FAIL'} {r['file']} ({r['kind']})")
            if "error" in r:
                print(f"  error: {r['error']}")
            for name, o in r["outputs"].items():
                mark = "ok  " if o["ok"] else "MISS"
                detail = o.get("error") or f"max|err| {o['max_abs_err']:.3g} (allowed {o['allowed']:.3g})"
                print(f"  {mark} {name}: {detail}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
