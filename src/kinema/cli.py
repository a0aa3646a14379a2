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
    image: Optional[Path] = typer.Option(None, "--image", help="First frame for image-to-video."),
    model: Optional[Path] = typer.Option(None, "--model", help="Model folder (default: the built-in model)."),
    size: Optional[str] = typer.Option(None, "--size", help="WIDTHxHEIGHT (default: the model's)."),
    frames: Optional[int] = typer.Option(None, "--frames", help="Frame count, 4n+1."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Sampling steps."),
    guidance: Optional[float] = typer.Option(None, "--guidance", help="Classifier-free guidance scale."),
    shift: Optional[float] = typer.Option(None, "--shift", help="Noise schedule shift."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="unipc, dpm++ or euler."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help="Negative prompt."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Random seed (default: random)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Output .mp4 path."),
    device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda, cuda:1 ... (default: auto)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32, bf16 or fp16 (default: auto)."),
) -> None:
    """Generate a video from a prompt (and optionally a first-frame image)."""
    from .generate_cmd import run_generate

    run_generate(**locals())


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and a non-zero exit."""
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
