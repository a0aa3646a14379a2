"""The `kinema` command line. Commands are thin: each parses its options and hands over to a
module imported lazily, so `kinema --help` stays fast and nothing heavy loads at import time."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(
    name="kinema",
    help="Text- and image-to-video generation with Wan2.2-class models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.command()
def info(
    model: Path = typer.Argument(..., help="Model folder (official or diffusers layout)."),
    json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Show what a model folder holds and how much memory a generation needs."""
    from .info import run_info

    run_info(model, json_out=json_out)


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="What the video should show."),
    image: Optional[Path] = typer.Option(
        None, "--image", help="First frame for image-to-video (TI2V and I2V models)."),
    model: Optional[Path] = typer.Option(
        None, "--model", help="Model folder, official or diffusers layout (default: the built-in model)."),
    size: Optional[str] = typer.Option(
        None, "--size", help="WIDTHxHEIGHT (default: the model's). With --image: the pixel area; "
        "the aspect ratio follows the image."),
    frames: Optional[int] = typer.Option(None, "--frames", help="Frame count, 4n+1 (default: the model's)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampling steps (default: the model's)."),
    guidance: Optional[str] = typer.Option(
        None, "--guidance", help="Classifier-free guidance scale; 1 skips the negative pass. Two-expert models "
        "also take LOW,HIGH (low-noise, high-noise expert) (default: the model's)."),
    shift: Optional[float] = typer.Option(None, "--shift", help="Noise schedule shift (default: the model's)."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="unipc, dpm++, euler or ddpm (stochastic: fresh noise "
                                           "each step, from the seed) (default: the model's)."),
    image_first: Optional[bool] = typer.Option(
        None, "--image-first/--joint", help="TI2V text-to-video: make the first frame from the text, then "
        "animate it (two passes), or all frames at once (default: the model's; the built-in model: image first)."),
    image_first_scale: Optional[int] = typer.Option(
        None, "--image-first-scale", help="Image first: draw the first frame this many times larger, then "
        "shrink it to the video size (default: the model's; 1 for the built-in model)."),
    negative_prompt: Optional[str] = typer.Option(
        None, "--negative-prompt", help="What to steer away from (default: the model's negative prompt)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed; the same seed gives the same video "
                                       "(default: random, recorded in the sidecar)."),
    output: Optional[Path] = typer.Option(
        None, "-o", "--output", help="Output .mp4 path (default: kinema_<prompt>_<seed>.mp4 here). "
        "A JSON sidecar with the settings is written next to it (same name, .json)."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: auto)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32, bf16 or fp16 (default: bf16 on CUDA, fp32 on CPU)."),
    no_watermark: bool = typer.Option(
        False, "--no-watermark", help="Do not embed the invisible watermark in the frames."),
    no_sign: bool = typer.Option(
        False, "--no-sign", help="Do not attach signed C2PA Content Credentials to the MP4."),
    include_prompt: bool = typer.Option(
        False, "--include-prompt", help="Write the prompt into the signed Content Credentials."),
) -> None:
    """Generate a video from a prompt (and optionally a first-frame image).

    Writes OUT.mp4 (H.264, browser-playable) and OUT.json (everything needed to reproduce it).
    """
    from .generate_cmd import run_generate

    run_generate(**locals())


@app.command()
def train(
    work: Path = typer.Option(Path("kinema-train"), "--work", help="Work folder (checkpoints, logs; resumable)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Exported model folder (default: WORK/model)."),
    steps: Optional[str] = typer.Option(None, "--steps", help="Comma list of tokenizer,vae,latents,decoder,dit,adapt,export (default: all)."),
    tiny: bool = typer.Option(False, "--tiny", help="Minutes-scale smoke configuration."),
    threads: int = typer.Option(2, "--threads", help="CPU threads for torch."),
    precision: str = typer.Option("auto", "--precision", help="auto, bf16 or fp32: autocast of the recipe's bf16 cycles (auto: bf16 only on CPUs with AVX512-BF16 or AMX)."),
) -> None:
    """Train the built-in small model from nothing (procedural data) and export it."""
    from .train.recipe import STEPS, Recipe, run_recipe, tiny_recipe

    chosen = tuple(s.strip() for s in steps.split(",")) if steps else STEPS
    run_recipe(work, tiny_recipe() if tiny else Recipe(), chosen, out=out, threads=threads,
               precision=precision)


@app.command("eval")
def evaluate(
    model: Optional[Path] = typer.Option(None, "--model", help="Model folder (default: the built-in model)."),
    seeds: int = typer.Option(3, "--seeds", help="Seeds per held-out prompt."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the report (JSON) here."),
    videos: Optional[Path] = typer.Option(None, "--videos", help="Also save the generated MP4s here."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampling steps (default: the model's)."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Guidance scale (default: the model's)."),
    i2v: bool = typer.Option(True, "--i2v/--no-i2v", help="Also score image-to-video from a first frame."),
    cli_runs: int = typer.Option(3, "--cli-runs", help="Timed `kinema generate` processes (0: none)."),
) -> None:
    """Score colour/shape/direction accuracy on the held-out prompts of the built-in model."""
    from .evaluate import run_eval

    run_eval(model, seeds=seeds, out=out, videos=videos, steps=steps, guidance=guidance, i2v=i2v,
             cli_runs=cli_runs)


@app.command()
def mark(
    input: Path = typer.Argument(..., help="Video to mark (any format PyAV reads)."),
    output: Path = typer.Option(..., "-o", "--output", help="Output .mp4 path."),
    cert: Optional[Path] = typer.Option(None, "--cert", help="PEM certificate chain to sign with (default: your local identity)."),
    key: Optional[Path] = typer.Option(None, "--key", help="PEM private key for --cert."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="Model that made the video, for the credentials."),
    source_type: Optional[str] = typer.Option(None, "--source-type", help="IPTC digital source type (default trainedAlgorithmicMedia)."),
    no_watermark: bool = typer.Option(False, "--no-watermark", help="Only sign; add no watermark."),
    no_sign: bool = typer.Option(False, "--no-sign", help="Only watermark; add no Content Credentials."),
    json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Add the invisible watermark and signed Content Credentials (C2PA) to an existing video."""
    from .provenance.commands import run_mark

    run_mark(input, output, cert=cert, key=key, no_watermark=no_watermark, no_sign=no_sign, model_name=model_name, source_type=source_type, json_out=json_out)


@app.command()
def verify(
    file: Path = typer.Argument(..., help="Video to check."),
    json_out: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
    trust: Optional[list[Path]] = typer.Option(None, "--trust", help="Extra PEM trust anchors (repeatable)."),
) -> None:
    """Report a video's watermark (with its false-positive probability) and Content Credentials."""
    from .provenance.commands import run_verify

    run_verify(file, json_out=json_out, trust=trust)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and a non-zero exit."""
    import os

    # Before torch (and its OpenMP runtime) is imported: idle OpenMP threads sleep instead of
    # spinning, which on a busy 2-core laptop made CPU generation up to 10x slower.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from .errors import KinemaError

    try:
        app(args=argv, standalone_mode=False)
    except KinemaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
