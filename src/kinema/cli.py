"""The `kinema` command line. Commands are thin: each parses its options and hands over to a
module imported lazily, so `kinema --help` stays fast and nothing heavy loads at import time."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

if TYPE_CHECKING:  # pragma: no cover
    from .request import Request

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


def generate(
    request: "Request",
    model: Optional[Path] = typer.Option(
        None, "--model", help="Model folder, official or diffusers layout (default: the built-in model)."),
    prompts_file: Optional[Path] = typer.Option(
        None, "--prompts-file", help="Instead of PROMPT: one prompt a line, one video each (the model loads "
        "once; with -o OUT.mp4 they are OUT_1.mp4, OUT_2.mp4, ...)."),
) -> None:
    """Generate a video from a prompt (and optionally a first-frame image).

    Writes OUT.mp4 (H.264, browser-playable) and OUT.json (everything needed to reproduce it).
    """
    from .generate_cmd import run_generate

    run_generate(request, model=model, prompts_file=prompts_file)


def _register_generate() -> None:
    # The flags are the fields of kinema.Request (generate_cmd.request_parameters); building
    # them needs typer only, not torch, so `kinema --help` stays fast.
    from .generate_cmd import with_request_parameters

    app.command("generate")(with_request_parameters(generate))


_register_generate()


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
    from .train.recipe import Recipe, tiny_recipe
    from .train.run import STEPS, run_recipe

    chosen = tuple(s.strip() for s in steps.split(",")) if steps else tuple(STEPS)
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
    from .train.evaluate import run_eval

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


# typer >= 0.22 bundles its own click, whose exceptions are not `click.ClickException`; the base
# class of typer's own BadParameter is the right one for either kind of typer.
_CLICK_EXCEPTION = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and a non-zero exit."""
    import os

    # Before torch (and its OpenMP runtime) is imported: idle OpenMP threads sleep instead of
    # spinning, which on a busy 2-core laptop made CPU generation up to 10x slower.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from .errors import KinemaError

    from .generate_cmd import to_flags

    try:
        app(args=argv, standalone_mode=False)
    except KinemaError as exc:
        print(f"error: {to_flags(str(exc))}", file=sys.stderr)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        print("aborted", file=sys.stderr)
        sys.exit(130)
    except _CLICK_EXCEPTION as exc:  # usage errors: bad value, unknown option or command, missing argument
        if type(exc).__name__ == "NoArgsIsHelpError":  # `kinema` alone: the help text
            exc.show()
        else:
            print(f"error: {' '.join(exc.format_message().split())}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
