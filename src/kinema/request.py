"""The generation request: one frozen `Request`, one field per user-facing option.

Every surface is derived from these fields: the `kinema generate` flags (`kinema.cli`), the
keywords of `kinema.prepare` / `kinema.generate` / `Pipeline.generate`, the sidecar's
`settings` block, the reproduce `command`, and the server's request body. Each field's
`metadata["kinema"]` is an `Option`: one-line help, the CLI flag, Python aliases and a group.

To add an option: add one field below (default None = "the model's", a simple type, an `Option`
with help and group), then its check in `kinema.validate.resolve` (which puts the resolved value
into `Settings.request`; `settings.<name>` reads it). Groups: "sampling" options change the
frames (they go into the reproduce command); "runtime" options do not: a load-time one is a
keyword of `kinema.load` of the same name and an entry of `Pipeline.runtime` (`run` refuses
settings asking for another value), a per-run one is read as `settings.<name>` in
`Pipeline.run`; "output" options say how the file is written (`Video.save` keywords). Flags,
sidecar and command follow by themselves; `tests/test_request.py` checks every field reaches each.
"""

from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterator, Optional, Union

from .errors import InputError

GROUPS = ("sampling", "runtime", "output")


@dataclass(frozen=True)
class Option:
    """How one `Request` field shows itself on each surface."""

    help: str  # one line, without "(default ...)"
    group: str = "sampling"
    flag: Optional[str] = None  # CLI long flag; default "--" + the name with dashes
    short: Optional[str] = None  # CLI short flag, e.g. "-o"
    off: Optional[str] = None  # bool fields: the off form; default "--no-" + the flag's name
    aliases: tuple[str, ...] = ()  # other Python keywords for the same option
    argument: bool = False  # a positional CLI argument instead of a flag
    cli_type: Optional[type] = None  # what the CLI parses when it differs from the field type
    show: Optional[Callable[[Any], str]] = None  # resolved value -> CLI text (the command)
    # sampling fields in the reproduce command: "always", or "changed" = only when the value
    # differs from the model's default (long or rarely changed options)
    command: str = "always"
    multiple: bool = False  # a repeatable CLI flag; the field holds a tuple (one item a use)
    metavar: Optional[str] = None  # the CLI's name for the value, e.g. FILE[:STRENGTH]

    def flags(self, name: str) -> tuple[str, Optional[str]]:
        """(the on / value flag, the off flag or None) of field `name` on the CLI."""
        if self.argument:
            return name.upper(), None
        flag = self.flag or "--" + name.replace("_", "-")
        return flag, self.off or "--no-" + flag[2:]


def _opt(help: str, **kw: Any) -> Any:
    return field(default=None, metadata={"kinema": Option(help, **kw)})


# ------------------------------------------------------------------------- CLI text <-> values


def parse_size(text: Any) -> Any:
    """'1280x704' (or '1280*704') -> (1280, 704); a tuple passes through."""
    if text is None or not isinstance(text, str):
        return text
    parts = text.lower().replace("*", "x").split("x")
    try:
        w, h = (int(p) for p in parts)
    except ValueError:
        raise InputError(f"size must be WIDTHxHEIGHT, e.g. 1280x704; got {text!r}") from None
    return w, h


def parse_guidance(text: Any) -> Any:
    """'5' -> 5.0; '3,4' -> (3.0, 4.0) = (low-noise, high-noise), the official order."""
    if text is None or not isinstance(text, str):
        return text
    try:
        values = [float(p.strip()) for p in text.split(",")]
    except ValueError:
        raise InputError(f"guidance must be a number or LOW,HIGH; got {text!r}") from None
    if len(values) == 1:
        return values[0]
    if len(values) == 2:
        return (values[0], values[1])
    raise InputError(f"guidance must be a number or LOW,HIGH; got {text!r}")


def _show_size(v: tuple[int, int]) -> str:
    return f"{v[0]}x{v[1]}"


def _show_guidance(v: Any) -> str:
    return ",".join(f"{g:g}" for g in v) if isinstance(v, tuple) else f"{v:g}"


def _show_lora(v: Any) -> str:
    """One resolved LoRA item (already "FILE:STRENGTH" text, see `validate`) as the flag's value."""
    return str(v)


def _show_number(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


# ------------------------------------------------------------------------------- the request


@dataclass(frozen=True)
class Request:
    """One generation request. None means "the model's default" (or "off" for output options).

    `guidance` is kinema's own spelling in the official order: one scale, or (low-noise,
    high-noise) for two-expert models. The diffusers aliases go the other way round:
    `guidance_scale` is the high-noise expert's (or the only) scale and `guidance_scale_2` the
    low-noise expert's, so guidance_scale=4, guidance_scale_2=3 is guidance=(3, 4).

    Python-only keywords of `generate` that are not fields: `generator` (its seed becomes
    `seed`), `num_videos_per_prompt`, a list as `prompt` (see `batch`), `output_type`, `callback`.
    """

    # -- sampling: these change the frames
    prompt: Optional[str] = _opt("What the video should show.", argument=True)
    # a path (the CLI), or in Python also a PIL image or a uint8 array [H, W, 3]
    image: Optional[Any] = _opt("First frame for image-to-video (TI2V and I2V models).", cli_type=str)
    negative_prompt: Optional[str] = _opt("What to steer away from (default: the model's negative prompt).",
                                           command="changed")
    size: Optional[Union[tuple[int, int], str]] = _opt(
        "WIDTHxHEIGHT (default: the model's). With --image: the pixel area; the aspect ratio follows the image.",
        aliases=("height", "width"), cli_type=str, show=_show_size)
    max_area: Optional[int] = _opt(
        "With --image: the pixel area of the output (default: width x height of --size).")
    frames: Optional[int] = _opt("Frame count, 4n+1 (default: the model's).", aliases=("num_frames",))
    steps: Optional[int] = _opt("Sampling steps (default: the model's).", aliases=("num_inference_steps",))
    guidance: Optional[Union[float, tuple[float, float]]] = _opt(
        "Classifier-free guidance scale; 1 skips the negative pass. Two-expert models also take LOW,HIGH "
        "(low-noise, high-noise expert) (default: the model's).",
        aliases=("guidance_scale", "guidance_scale_2"), cli_type=str, show=_show_guidance)
    shift: Optional[float] = _opt("Noise schedule shift (default: the model's).", aliases=("flow_shift",),
                                  show=_show_number)
    sampler: Optional[str] = _opt(
        "unipc, dpm++, euler, lightning (Euler on the 4-step distilled grid) or ddpm (stochastic: fresh noise "
        "each step, from the seed) (default: the model's).")
    seed: Optional[int] = _opt(
        "Random seed; the same seed gives the same video (default: random, recorded in the sidecar).")
    image_first: Optional[bool] = _opt(
        "TI2V text-to-video: make the first frame from the text, then animate it (two passes), or all frames "
        "at once (default: the model's; the built-in model: image first).", off="--joint", command="changed")
    image_first_scale: Optional[int] = _opt(
        "Image first: draw the first frame this many times larger, then shrink it to the video size "
        "(default: the model's; 1 for the built-in model).", command="changed")
    preset: Optional[str] = _opt(
        "A published sampling recipe: lightning-4step (4-step distilled models and LoRAs: Euler, shift 5, no "
        "CFG); it fills --sampler, --steps, --guidance and --shift where they are not given (default: none).")
    # In Python also a `kinema.lora.LoraSpec`, a Path or (path, strength[, target]) per item
    loras: Optional[tuple[Any, ...]] = _opt(
        "LoRA file to apply, FILE[:STRENGTH] or FILE:HIGH,LOW (two-expert models); repeatable (default: none).",
        flag="--lora", cli_type=str, multiple=True, show=_show_lora, metavar="FILE[:S]")
    lora_high: Optional[tuple[Any, ...]] = _opt(
        "LoRA file for the high-noise expert only, FILE[:STRENGTH]; repeatable (default: none).",
        cli_type=str, multiple=True, show=_show_lora, metavar="FILE[:S]")
    lora_low: Optional[tuple[Any, ...]] = _opt(
        "LoRA file for the low-noise expert only, FILE[:STRENGTH]; repeatable (default: none).",
        cli_type=str, multiple=True, show=_show_lora, metavar="FILE[:S]")

    # -- runtime: where and how the model runs; the frames stay the same (up to rounding)
    device: Optional[str] = _opt("cpu, cuda, cuda:1 ... (default: auto).", group="runtime")
    dtype: Optional[str] = _opt("fp32, bf16 or fp16 (default: bf16 on CUDA, fp32 on CPU).", group="runtime")
    lora_mode: Optional[str] = _opt(
        "merge (LoRAs added into the weights) or side (a side branch per layer, weights untouched) "
        "(default: merge).", group="runtime")

    # -- output: how the file is written
    output: Optional[str] = _opt(
        "Output .mp4 path (default: kinema_<prompt>_<seed>.mp4 here). A JSON sidecar with the settings is "
        "written next to it (same name, .json).", group="output", short="-o", cli_type=str)
    watermark: Optional[bool] = _opt("Embed the invisible watermark in the frames (default: on).",
                                     group="output")
    sign: Optional[bool] = _opt("Attach signed C2PA Content Credentials to the MP4 (default: on).",
                                group="output")
    include_prompt: Optional[bool] = _opt("Write the prompt into the signed Content Credentials (default: off).",
                                          group="output", off="--no-include-prompt")
    overwrite: Optional[bool] = _opt("Replace an existing output video and its sidecar (default: refuse).",
                                     group="output", off="--no-overwrite")

    # -- building and reading -----------------------------------------------------------------

    @classmethod
    def from_options(cls, prompt: Any = None, image: Any = None, **options: Any) -> "Request":
        """A request from Python keywords: kinema's names or their aliases (see `Option.aliases`).

        `height`/`width` make `size`; `guidance_scale` (high-noise or only expert) and
        `guidance_scale_2` (low-noise expert) make `guidance`. Unknown keywords: InputError naming them.
        """
        values: dict[str, Any] = {"prompt": prompt, "image": image}
        names = {f.name for f in fields(cls)}
        unknown = [k for k in options if k not in names and k not in _ALIASES]
        if unknown:
            raise InputError(f"unknown option {unknown[0]}=; " + _closest(unknown[0], names))
        for key, value in options.items():
            if key in names:
                values[key] = value
        _apply_aliases(values, options)
        return cls(**values)

    @classmethod
    def options(cls, group: Optional[str] = None) -> Iterator[tuple[str, Option]]:
        """(field name, Option) of every field, or of one group, in declaration order."""
        for f in fields(cls):
            opt = f.metadata["kinema"]
            if group is None or opt.group == group:
                yield f.name, opt

    def given(self, group: Optional[str] = None) -> dict[str, Any]:
        """The fields that are set (not None), optionally of one group."""
        return {n: getattr(self, n) for n, _ in self.options(group) if getattr(self, n) is not None}

    @classmethod
    def batch(cls, prompt: Any = None, image: Any = None, num_videos_per_prompt: int = 1,
              **options: Any) -> list["Request"]:
        """The requests of one `generate` call, diffusers style: `prompt` may be a list (one video
        each), `num_videos_per_prompt` videos per prompt (with `seed=S`: seeds S, S+1, ...), and
        `generator=` a `torch.Generator` (or a list, one per video) whose seed
        (`initial_seed()`) is the video's seed, so `generator=torch.Generator().manual_seed(42)`
        is `seed=42`. With several videos, `output="clip.mp4"` becomes clip_1.mp4, clip_2.mp4, ..."""
        prompts = list(prompt) if isinstance(prompt, (list, tuple)) else [prompt]
        if not prompts:
            raise InputError("prompt= is an empty list")
        if isinstance(num_videos_per_prompt, bool) or not isinstance(num_videos_per_prompt, int) \
                or num_videos_per_prompt < 1:
            raise InputError(f"num_videos_per_prompt= must be an integer >= 1, got {num_videos_per_prompt!r}")
        count = len(prompts) * num_videos_per_prompt
        generator = options.pop("generator", None)
        seeds: list[Any] = [options.get("seed")] * count
        if generator is not None:
            if options.get("seed") is not None:
                raise InputError("give seed= or generator=, not both")
            gens = list(generator) if isinstance(generator, (list, tuple)) else [generator]
            if len(gens) not in (1, count):
                raise InputError(f"generator= is a list of {len(gens)} for {count} videos")
            if not all(hasattr(g, "initial_seed") for g in gens):
                raise InputError("generator= must be a torch.Generator (or a list of them)")
            seeds = [int(gens[0 if len(gens) == 1 else k].initial_seed()) for k in range(count)]
        if len(set(map(str, seeds))) == 1 and seeds[0] is not None:  # one seed for every video
            seeds = [seeds[0] + j for _ in prompts for j in range(num_videos_per_prompt)]
        output = options.get("output")
        out = []
        for k in range(count):
            opts = {**options, "seed": seeds[k]}
            if output is not None and count > 1:
                opts["output"] = numbered(output, k + 1)
            out.append(cls.from_options(prompts[k // num_videos_per_prompt], image, **opts))
        return out


def numbered(path: Any, k: int) -> str:
    """clip.mp4 -> clip_K.mp4: the K-th (1-based) of several outputs asked for under one name."""
    import os

    root, ext = os.path.splitext(os.fspath(path))
    return f"{root}_{k}{ext}"


_ALIASES = {alias: name for name, opt in Request.options() for alias in opt.aliases}


def _closest(name: str, names: set[str]) -> str:
    import difflib

    near = difflib.get_close_matches(name, sorted(names | set(_ALIASES)), n=1)
    return f"did you mean {near[0]}=?" if near else "see help(kinema.Request) for the options"


def _apply_aliases(values: dict[str, Any], options: dict[str, Any]) -> None:
    """Fold the diffusers-style aliases in `options` into kinema's fields in `values`."""
    def clash(alias: str, name: str) -> None:
        if values.get(name) is not None:
            raise InputError(f"give {name}= or {alias}=, not both")

    if "height" in options or "width" in options:
        clash("height/width", "size")
        if options.get("height") is None or options.get("width") is None:
            raise InputError("height= and width= go together (or give size=(width, height))")
        values["size"] = (options["width"], options["height"])
    for alias in ("num_frames", "num_inference_steps", "flow_shift"):
        if alias in options and options[alias] is not None:
            clash(alias, _ALIASES[alias])
            values[_ALIASES[alias]] = options[alias]
    high, low = options.get("guidance_scale"), options.get("guidance_scale_2")
    if high is not None or low is not None:
        clash("guidance_scale", "guidance")
        if high is None:
            raise InputError("guidance_scale_2= (the low-noise expert's) needs guidance_scale= too")
        values["guidance"] = high if low is None else (low, high)  # kinema's order: (low, high)


__all__ = ["GROUPS", "Option", "Request", "numbered", "parse_guidance", "parse_size"]
