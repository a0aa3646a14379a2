"""Round-trip score of a VAE: the shape/colour/direction ceiling of the built-in model.

    python benchmarks/vae_roundtrip.py FILE_OR_FOLDER [--repeats 2] [--threads 2] [--small-objects]

FILE_OR_FOLDER: a model folder (official or diffusers layout, e.g. the built-in model), a
Wan2.2_VAE.pth, or a `kinema train` work-folder file (vae.pt, vae_tuned.pt, or a trainer
checkpoint such as vae_ckpt.pt, whose EMA weights are used). Encoder and decoder widths are
read from the weights. Ground truth fills: square 1.0, circle ~0.79, triangle ~0.51. The clips
have the built-in model's object sizes (`data.LAYOUT`); --small-objects scores the radius 16-23
objects of sessions 1-7 (`data.SMALL_OBJECTS`), whose numbers benchmarks/builtin_eval.md quotes.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def load_vae(path: Path):
    from kinema.loading import ComponentInfo, TensorMeta, infer_vae_config
    from kinema.models.vae import WanVAE

    if path.is_dir():
        from kinema.pipeline import load

        return load(path).vae
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("ema", state)  # trainer checkpoints keep the EMA weights there
    # the loader's own shape inference (widths, version, latent constants)
    metas = {k: TensorMeta(tuple(v.shape), v.dtype, path) for k, v in state.items()}
    vae = WanVAE(infer_vae_config(ComponentInfo("vae", [path], "official", metas)))
    vae.load_state_dict({k: v.float() for k, v in state.items()})
    return vae.eval()


def main() -> None:
    from kinema.train.evaluate import vae_round_trip

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("path", type=Path)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--small-objects", action="store_true", help="radius 16-23 objects (sessions 1-7)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from kinema.train.data import LAYOUT, SMALL_OBJECTS

    t0 = time.perf_counter()
    report = vae_round_trip(load_vae(args.path), repeats=args.repeats,
                            layout=SMALL_OBJECTS if args.small_objects else LAYOUT)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
