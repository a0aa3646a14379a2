"""Randomized bad-input run: mutated weight headers, configs, sampling defaults, images and CLI
arguments, each of which must end in a one-line user error (or be accepted as valid) quickly and
without a large allocation. The fixed cases live in tests/test_bad_*.py; this runs many more.

    python benchmarks/fuzz_inputs.py [--cases 500] [--seed 0] [--json]

Each case is judged: "error" (a KinemaError of one line, in < 5 s), "accepted" (the mutation
left a valid input), or a failure (any other exception = a traceback for the user, a multi-line
message, or a slow case). Peak RSS growth over the run is reported (ru_maxrss).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import resource
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


JUNK_VALUES = [0, -1, -(2**63), 2**63, 1e9, 1e308, float("nan"), float("inf"), -float("inf"), 0.5,
               "", "abc", "1e9", None, True, False, [], [1, 2], {}, {"a": 1}, "\xff\xfe", 3, 7, 1.0]


def mutate_json(doc: dict, rng: random.Random) -> dict:
    doc = dict(doc)
    keys = list(doc) or ["x"]
    for _ in range(rng.randint(1, 3)):
        doc[rng.choice(keys + ["num_heads", "text_len", "num_layers", "eps", "dim", "frames"])] = \
            rng.choice(JUNK_VALUES)
    return doc


def mutate_header(raw: bytes, rng: random.Random) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    names = [k for k in header if k != "__metadata__"]
    choice = rng.randrange(6)
    if choice == 0:  # break a shape
        entry = header[rng.choice(names)]
        entry["shape"] = [rng.choice([-1, 0, 10**12, 2.5, "x", 2**40]) for _ in range(rng.randint(0, 4))]
    elif choice == 1:  # break offsets
        entry = header[rng.choice(names)]
        entry["data_offsets"] = [rng.choice([-5, 0, 7, 10**15, 2.0]), rng.choice([-5, 0, 7, 10**15])]
    elif choice == 2:  # wrong dtype
        header[rng.choice(names)]["dtype"] = rng.choice(["F128", "", 5, None, "I8"])
    elif choice == 3:  # a far block index
        header[f"blocks.{rng.choice([999, 99999, 10**9])}.modulation"] = header[names[0]]
    elif choice == 4:  # lie about the header length
        body = raw[8 + n:]
        return struct.pack("<Q", rng.choice([0, 1, n + 10**6, 2**63])) + raw[8:8 + n] + body
    else:  # random bytes in the header
        text = bytearray(raw[8:8 + n])
        for _ in range(rng.randint(1, 8)):
            text[rng.randrange(len(text))] = rng.randrange(256)
        return raw[:8] + bytes(text) + raw[8 + n:]
    new = json.dumps(header).encode()
    return struct.pack("<Q", len(new)) + new + raw[8 + n:]


def mutate_image(path: Path, rng: random.Random) -> None:
    from PIL import Image

    kind = rng.randrange(4)
    if kind == 0:
        data = path.read_bytes()
        path.write_bytes(data[: rng.randrange(len(data))])
    elif kind == 1:
        data = bytearray(path.read_bytes())
        for _ in range(rng.randint(1, 20)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        path.write_bytes(bytes(data))
    elif kind == 2:
        mode = rng.choice(["I;16", "I", "F", "L", "1", "P", "RGBA", "CMYK", "LA"])
        Image.new(mode, (rng.randint(1, 64), rng.randint(1, 64))).save(path.with_suffix(".tiff"))
        shutil.move(path.with_suffix(".tiff"), path)
    else:
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(0, 300))))


BAD_ARGS = ["--frames", "--steps", "--size", "--guidance", "--shift", "--seed", "--sampler", "--image",
            "--negative-prompt", "--image-first-scale", "--dtype", "--device"]
ARG_VALUES = ["0", "-1", "abc", "1e9", "400001", "32768x32768", "0x0", "nan", "inf", "3,4,5", "", "x",
              "/nonexistent.png", "cuda:9", "fp4", "99999999999999999999999", "1.5", "16x16"]


class ReachedLoad(Exception):
    """Raised instead of loading weights: every check before the load passed."""


def run_case(fn) -> tuple[str, str]:
    from kinema.errors import KinemaError

    start = time.perf_counter()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            fn()
        outcome, detail = "accepted", ""
    except KinemaError as exc:
        msg = str(exc)
        outcome, detail = ("error", msg) if "\n" not in msg and msg else ("multi-line", msg)
    except SystemExit as exc:  # the CLI: 2 for a user error
        text = err.getvalue().strip()
        if exc.code == 2 and len(text.splitlines()) == 1:
            outcome, detail = "error", text
        elif exc.code in (0, None):
            outcome, detail = "accepted", ""
        else:
            outcome, detail = "bad-exit", f"exit {exc.code}: {text[-300:]}"
    except ReachedLoad:
        outcome, detail = "accepted", "reached the weight load"
    except Exception as exc:  # noqa: BLE001 - this is what the run looks for
        outcome, detail = "traceback", f"{type(exc).__name__}: {exc}"[:300]
    if time.perf_counter() - start > 5.0 and outcome in ("error", "accepted"):
        outcome, detail = "slow", f"{time.perf_counter() - start:.1f} s: {detail}"
    return outcome, detail


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from PIL import Image

    from kinema.cli import main as cli_main
    from kinema.tasks import load_image
    from kinema.loading import inspect_folder
    from kinema.testing.fixtures import make_tiny_model

    import kinema.loading

    def refuse_load(*a, **k):
        raise ReachedLoad()

    kinema.loading.load_model = refuse_load  # a valid CLI request stops where the weights would load
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="kinema-fuzz-"))
    clean = make_tiny_model(root / "clean", "ti2v", "official", seed=0)
    img = root / "clean.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(img)
    rss0 = _rss_mb()
    counts: dict[str, dict[str, int]] = {}
    failures: list[dict] = []
    for i in range(args.cases):
        kind = rng.choice(["header", "config", "defaults", "image", "cli"])
        case = root / f"case{i}"
        if kind in ("header", "config", "defaults"):
            shutil.copytree(clean, case)
            if kind == "header":
                f = case / "diffusion_pytorch_model.safetensors"
                f.write_bytes(mutate_header(f.read_bytes(), rng))
            elif kind == "config":
                f = case / "config.json"
                f.write_text(json.dumps(mutate_json(json.loads(f.read_text()), rng)))
            else:
                f = case / "kinema.json"
                doc = json.loads(f.read_text())
                doc["defaults"] = mutate_json(doc.get("defaults", {}), rng)
                f.write_text(json.dumps(doc))
            outcome, detail = run_case(lambda c=case: inspect_folder(c))
        elif kind == "image":
            case.mkdir()
            p = case / "x.png"
            shutil.copy(img, p)
            mutate_image(p, rng)
            outcome, detail = run_case(lambda p=p: load_image(p))
        else:
            argv = ["generate", rng.choice(["a red circle", "", "   ", "a\x00b", "x" * 5000])]
            for _ in range(rng.randint(1, 3)):
                argv += [rng.choice(BAD_ARGS), rng.choice(ARG_VALUES)]
            argv += ["--model", str(clean), "-o", str(root / f"out{i}.mp4")]
            outcome, detail = run_case(lambda a=argv: cli_main(a))
        counts.setdefault(kind, {}).setdefault(outcome, 0)
        counts[kind][outcome] += 1
        if outcome not in ("error", "accepted"):
            failures.append({"kind": kind, "outcome": outcome, "detail": detail})
        shutil.rmtree(case, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    report = {"cases": args.cases, "seed": args.seed, "by_kind": counts, "failures": failures[:20],
              "failure_count": len(failures), "rss_growth_mb": round(_rss_mb() - rss0, 1)}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{args.cases} cases (seed {args.seed}), RSS growth {report['rss_growth_mb']} MB")
        for kind, c in sorted(counts.items()):
            print(f"  {kind:9s} " + ", ".join(f"{k} {v}" for k, v in sorted(c.items())))
        for f in failures[:20]:
            print(f"  FAIL {f['kind']} {f['outcome']}: {f['detail']}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
