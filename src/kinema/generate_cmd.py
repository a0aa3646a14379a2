"""`kinema generate`: its flags (made from the `Request` fields), then validate, load, sample
with a progress bar, save.

Every check a user can fail (model folder, sizes, frames, steps, guidance, image, output path,
prompt policy) runs before the model weights are loaded (`kinema.prepare` reads headers only),
so a bad request fails in well under a second with one line and leaves no file behind.
"""

from __future__ import annotations

import inspect
import re
import sys
import time
import typing
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

from .request import Request

_SLUG_MAX = 40


def default_output_name(prompt: str, seed: int) -> Path:
    """kinema_<prompt-slug>_<seed>.mp4 in the current folder."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:_SLUG_MAX].rstrip("-") or "video"
    return Path(f"kinema_{slug}_{seed}.mp4")


# ------------------------------------------------------------------------------ the flags


def flag_of(name: str) -> str:
    """The CLI flag of a `Request` field."""
    return dict(Request.options())[name].flags(name)[0]


def _cli_type(name: str, annotation: Any, cli_type: Optional[type]) -> type:
    if cli_type is not None:
        return cli_type
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(args) != 1 or args[0] not in (str, int, float, bool):
        raise TypeError(f"Request.{name}: give its Option a cli_type (the field type is {annotation})")
    return args[0]


def request_parameters() -> list[inspect.Parameter]:
    """One typer parameter per `Request` field: the `kinema generate` flags."""
    import typer

    hints = typing.get_type_hints(Request)
    params = []
    for name, opt in Request.options():
        kind = _cli_type(name, hints[name], opt.cli_type)
        if opt.argument:
            default = typer.Argument(None, help=opt.help, show_default=False, metavar=name.upper())
        else:
            flag, off = opt.flags(name)
            decls = [f"{flag}/{off}"] if kind is bool else [flag]
            if opt.short:
                decls.insert(0, opt.short)
            default = typer.Option(None, *decls, help=opt.help, show_default=False, metavar=opt.metavar,
                                   rich_help_panel={"sampling": None, "runtime": "Runtime",
                                                    "output": "Output"}[opt.group])
        annotation = Optional[list[kind]] if opt.multiple else Optional[kind]  # type: ignore[valid-type]
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=annotation))
    return params


def with_request_parameters(func: Callable[..., Any]) -> Callable[..., Any]:
    """Give the typer command `func(request: Request, **own)` the `Request` fields as flags, after
    its own parameters; typer's values are folded into one `Request` before `func` runs."""
    own = list(inspect.signature(func).parameters.values())[1:]
    fields = request_parameters()
    names = {p.name for p in fields}

    def command(**kwargs: Any) -> Any:
        # repeatable flags: typer gives a list ([] when not used)
        values = {k: (tuple(v) or None) if isinstance(v, list) else v for k, v in kwargs.items() if k in names}
        request = Request(**values)
        return func(request, **{k: v for k, v in kwargs.items() if k not in names})

    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + fields
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in params}
    command.__name__, command.__doc__ = func.__name__, func.__doc__
    return command


def to_flags(message: str) -> str:
    """A library message in Python terms (`image=`) in the CLI's (`--image`)."""
    names = {n for n, _ in Request.options()}
    return re.sub(r"\b([a-z_]+)=", lambda m: flag_of(m.group(1)) if m.group(1) in names else m.group(0), message)


# ------------------------------------------------------------------------------ the run


class _Progress:
    """A step progress bar on stderr (step n/N, it/s, ETA) that prints 'decoding' when done."""

    def __init__(self, total: int, enabled: bool = True):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc="sampling", unit="step", file=sys.stderr, disable=not enabled,
                        dynamic_ncols=True, leave=True,
                        bar_format="{desc}: step {n_fmt}/{total_fmt} |{bar}| {rate_fmt} ETA {remaining}")

    def __call__(self, info: Any) -> None:
        self.bar.update(1)
        if self.bar.n >= self.bar.total:
            self.bar.close()
            print("decoding ...", file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


def _one_line_warnings(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`func(...)`, with its size and LoRA warnings as one `warning:` line each on stderr."""
    from .lora import LoraWarning
    from .validate import SizeWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SizeWarning)
        warnings.simplefilter("always", LoraWarning)
        result = func(*args, **kwargs)
    for w in caught:
        if issubclass(w.category, (SizeWarning, LoraWarning)):
            print(f"warning: {to_flags(str(w.message))}", file=sys.stderr, flush=True)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return result


def _prepare(path: Path, request: Request) -> Any:
    """`kinema.prepare`, its warnings one line each."""
    from .pipeline import prepare

    return _one_line_warnings(prepare, path, request)


def _read_prompts(path: Path) -> list[str]:
    """The prompts of a --prompts-file: one a line; blank lines are skipped."""
    from .errors import InputError

    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read --prompts-file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise InputError(f"--prompts-file {path} holds no prompt")
    return prompts


def run_generate(request: Request, model: Optional[Path] = None, prompts_file: Optional[Path] = None,
                 progress: bool = True) -> list[Path]:
    """Generate the video of a CLI request, or one per line of `prompts_file` (the model loaded
    once, every request checked before it loads); returns the written paths."""
    from .errors import InputError
    from .pipeline import load, model_path
    from .placement import resolve_device
    from .video import check_output_path

    start = time.perf_counter()
    if (request.prompt is None) == (prompts_file is None):
        raise InputError("give a PROMPT or --prompts-file FILE" if prompts_file is None
                         else "give a PROMPT or --prompts-file FILE, not both")
    path = model_path(model)
    options = {k: v for k, v in request.given().items() if k != "prompt"}
    if prompts_file is not None:
        requests = Request.batch(_read_prompts(prompts_file), **options)
    else:
        requests = [request]
    jobs = []
    for r in requests:
        settings = _prepare(path, r)
        out = Path(settings.output) if settings.output else check_output_path(default_output_name(
            settings.prompt, settings.seed), overwrite=settings.overwrite)
        jobs.append((r, settings, out))

    written = []
    try:
        print(f"loading {path} on {resolve_device(request.device)} ...", file=sys.stderr, flush=True)
        # every job runs the same LoRAs: no copy of the weights they change is needed
        one_set = len({tuple(s.lora_specs) for _, s, _ in jobs}) == 1
        pipe = load(path, **request.given("runtime"), restore_loras=not one_set)
        for r, settings, out in jobs:
            if pipe.spec != settings.spec:  # the folder changed since it was inspected
                settings = pipe.settings(**{**r.given(), "seed": settings.seed})
            w, h = settings.plan.size
            passes = 2 if settings.image_first else 1
            print(f"generating {settings.frames} frames at {w}x{h}, {settings.steps} steps "
                  f"({settings.sampler}), seed {settings.seed}"
                  + (" (first frame, then the video: 2 passes)" if passes == 2 else ""), file=sys.stderr, flush=True)
            bar = _Progress(passes * settings.steps, enabled=progress)
            try:
                video = _one_line_warnings(pipe.run, settings, callback=bar)
            finally:
                bar.close()
            video.save(out, watermark=settings.watermark, sign=settings.sign, include_prompt=settings.include_prompt,
                       overwrite=settings.overwrite)
            w, h = video.size
            print(f"saved {out} ({video.num_frames} frames, {w}x{h}, {video.fps:g} fps) in "
                  f"{time.perf_counter() - start:.1f} s", flush=True)
            written.append(out)
    except KeyboardInterrupt as exc:
        import typer

        if getattr(exc, "signum", None) is not None:
            raise  # SIGTERM / SIGHUP: the CLI exits 128 + the signal number
        raise typer.Abort() from None  # "aborted", exit 130, no traceback; no partial file stays
    return written


__all__ = ["default_output_name", "flag_of", "request_parameters", "run_generate", "to_flags",
           "with_request_parameters"]
