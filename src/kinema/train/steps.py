"""The individual recipe steps (see `recipe.py`); each reads and writes files in the work folder."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .data import SQUARE, Layout
from .recipe import Recipe, final_dit_spec
from .trainer import LossFn, Trainer

Log = Callable[[str], None]


def train_tokenizer(work: Path, recipe: Recipe, log: Log) -> Path:
    """Sentencepiece unigram tokenizer on the caption corpus, written as an umT5 tokenizer folder."""
    from .tiny_tokenizer import make_tiny_tokenizer
    from .data import caption_corpus

    folder = work / "tokenizer"
    if (folder / "spiece.model").is_file():
        log("tokenizer exists, skipped")
        return folder
    corpus = caption_corpus(recipe.seed, recipe.corpus_size)
    make_tiny_tokenizer(folder, vocab_size=recipe.vocab_size, texts=corpus)
    log(f"tokenizer: {len(corpus)} captions -> {folder}")
    return folder


def _vae_path(work: Path) -> Path:
    return work / "vae.pt"


def train_vae(work: Path, recipe: Recipe, log: Log, progress: bool = True) -> Path:
    from ..models.vae import WanVAE
    from .data import make_clip, train_combos
    from .vae_train import clips_to_tensor, fold_latent_stats, init_for_training, latent_stats, make_vae_loss_fn

    final = _vae_path(work)
    if final.is_file():
        log("vae exists, skipped")
        return final
    torch.manual_seed(recipe.seed)
    vae = init_for_training(WanVAE(recipe.vae.vae_config()))
    log(f"vae: {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M parameters")
    trainer = Trainer(vae, make_vae_loss_fn(vae, recipe.vae, recipe.seed, recipe.layout), recipe.vae_optim,
                      checkpoint=work / "vae_ckpt.pt", name="vae", log=log)
    trainer.maybe_resume()
    trainer.run(progress=progress)
    vae.load_state_dict(trainer.ema_state())
    vae.eval()
    # latent statistics on full-size clips, folded into conv1/conv2
    clips = [make_clip(recipe.seed + 2000, i, recipe.size, recipe.frames, combos=train_combos(),
                       layout=recipe.layout)[0] for i in range(8)]
    mean, std = latent_stats(vae, clips_to_tensor(clips))
    fold_latent_stats(vae, mean, std)
    torch.save(vae.state_dict(), final)
    log(f"vae: final loss {trainer.recent_loss(20)}; latent std range "
        f"{float(std.min()):.3f}..{float(std.max()):.3f}")
    return final


def load_trained_vae(work: Path, recipe: Recipe):
    from ..models.vae import WanVAE

    vae = WanVAE(recipe.vae.vae_config())
    vae.load_state_dict(torch.load(_vae_path(work), map_location="cpu", weights_only=True))
    return vae.eval().requires_grad_(False)


def latent_layouts(recipe: Recipe) -> list[Layout]:
    """Every clip layout a recipe step trains on, the recipe's own first."""
    layouts = [recipe.layout]
    for cycle in (*recipe.decoder_more, *recipe.dit_more):
        if cycle.layout is not None and cycle.layout not in layouts:
            layouts.append(cycle.layout)
    return layouts


def _layout_tag(layout: Layout) -> str:
    lo, hi = layout.radius
    tag = f"r{lo:g}-{hi:g}_t{layout.travel:g}"
    if layout.grid:
        tag += f"_g{layout.grid:g}"
    if layout.square != SQUARE:  # the default keeps the tags of older sets
        tag += f"_s{layout.square:g}"
    return tag


def latents_path(work: Path, recipe: Recipe, layout: Layout) -> Path:
    if layout == recipe.layout:
        return work / "latents.pt"
    return work / f"latents_{_layout_tag(layout)}.pt"


def shapes_path(work: Path, layout: Layout, scale: int = 1) -> Path:
    return work / f"shapes_{_layout_tag(layout)}{'' if scale == 1 else f'_x{scale}'}.pt"


def shape_sets(recipe: Recipe) -> list[tuple[Layout, int]]:
    """(layout, scale) of every shape set a DiT cycle uses: scale 1 for shape pairs, the
    cycle's `keyframe_scale` for keyframes."""
    sets: list[tuple[Layout, int]] = []
    for cycle in recipe.dit_more:
        layout = cycle.layout or recipe.layout
        wanted = ([(layout, 1)] if cycle.pair_batch else []) + (
            [(layout, cycle.keyframe_scale)] if cycle.keyframe_batch else [])
        sets += [w for w in wanted if w not in sets]
    return sets


def _latent_loader(work: Path, recipe: Recipe, log: Log) -> Callable[[Layout], dict]:
    """Loads each latent set ({"latents", "specs"}) once per recipe step."""
    cache: dict[Layout, dict] = {}

    def load(layout: Layout) -> dict:
        if layout not in cache:
            path = latents_path(work, recipe, layout)
            cache[layout] = torch.load(path, map_location="cpu", weights_only=True)
            log(f"{cache[layout]['latents'].shape[0]} clips from {path.name}")
        return cache[layout]
    return load


def encode_latents(work: Path, recipe: Recipe, log: Log, progress: bool = True) -> list[Path]:
    """The latent set of every layout the recipe trains on (see `encode_latent_set`), and the
    shape sets the DiT cycles take shape pairs or keyframes from (`encode_shape_set`)."""
    return ([encode_latent_set(work, recipe, layout, log, progress) for layout in latent_layouts(recipe)]
            + [encode_shape_set(work, recipe, layout, log, progress, scale) for layout, scale in shape_sets(recipe)])


def _spec_row(spec) -> list[str]:
    """What a latent or shape set stores of a clip spec (enough to draw its captions)."""
    return [spec.colour, spec.shape, spec.direction, spec.background, spec.speed]


def _save_atomically(obj: dict, final: Path) -> None:
    tmp = final.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(final)  # a crash never leaves a half-written set


def encode_latent_set(work: Path, recipe: Recipe, layout: Layout, log: Log, progress: bool = True) -> Path:
    """Encode `recipe.num_clips` training clips of `layout` once (fp16 latents + their clip specs)."""
    from tqdm import tqdm

    from .data import make_clip, train_combos
    from .vae_train import clips_to_tensor

    final = latents_path(work, recipe, layout)
    if final.is_file():
        log(f"{final.name} exists, skipped")
        return final
    vae = load_trained_vae(work, recipe)
    combos = train_combos()
    latents, specs = [], []
    batch = 4
    for start in tqdm(range(0, recipe.num_clips, batch), desc="latents", disable=not progress, mininterval=5.0):
        items = [make_clip(recipe.seed + 3000, i, recipe.size, recipe.frames, combos=combos, layout=layout)
                 for i in range(start, min(start + batch, recipe.num_clips))]
        with torch.no_grad():
            z = vae.encode(clips_to_tensor([v for v, _, _ in items]))
        latents.append(z.half())
        specs += [s for _, _, s in items]
    z = torch.cat(latents)
    _save_atomically({"latents": z, "specs": [_spec_row(s) for s in specs]}, final)
    log(f"{final.name}: {tuple(z.shape)}, mean {float(z.float().mean()):.3f} std {float(z.float().std()):.3f}")
    return final


def encode_shape_set(work: Path, recipe: Recipe, layout: Layout, log: Log, progress: bool = True,
                     scale: int = 1) -> Path:
    """Frame 0 of each clip of the latent set (same specs), drawn as every shape and encoded:
    latents [N, shapes, z, 1, h, w] fp16 and `valid` [N, shapes], false where the caption
    (colour, shape, direction) is a held-out combination, which training must never show.
    `scale` > 1 draws the frames that many times larger (objects too: the same scene, finer)."""
    from tqdm import tqdm

    from .data import SHAPES, clip_rng, render_clip, sample_spec, train_combos
    from .vae_train import clips_to_tensor

    final = shapes_path(work, layout, scale)
    if final.is_file():
        log(f"{final.name} exists, skipped")
        return final
    vae = load_trained_vae(work, recipe)
    combos = train_combos()
    allowed = set(combos)
    latents, valid, rows = [], [], []
    batch = 16
    for start in tqdm(range(0, recipe.num_clips, batch), desc="shapes", disable=not progress, mininterval=5.0):
        specs = [sample_spec(clip_rng(recipe.seed + 3000, i), combos=combos, layout=layout)
                 for i in range(start, min(start + batch, recipe.num_clips))]
        images = [render_clip(replace(spec, shape=shape), recipe.size * scale, 1) for spec in specs for shape in SHAPES]
        with torch.no_grad():
            z = vae.encode(clips_to_tensor(images))  # [B * shapes, z, 1, h, w]
        latents.append(z.half().unflatten(0, (len(specs), len(SHAPES))))
        valid += [[(s.colour, shape, s.direction) in allowed for shape in SHAPES] for s in specs]
        rows += [_spec_row(s) for s in specs]
    z, usable = torch.cat(latents), torch.tensor(valid)
    _save_atomically({"latents": z, "valid": usable, "specs": rows, "shapes": list(SHAPES)}, final)
    log(f"{final.name}: {tuple(z.shape)}, {int(usable.sum())} valid images")
    return final


def build_dit_and_text(recipe: Recipe, vocab: int, final: bool = False):
    """The DiT and text encoder as the first DiT cycle starts them, or (`final`) as the last
    cycle leaves them (a cycle may deepen the DiT)."""
    from ..models.dit import WanModel
    from ..models.t5 import T5Encoder
    from .dit_train import DiTWithText

    spec = final_dit_spec(recipe) if final else recipe.dit
    dit = WanModel(spec.dit_config(recipe.vae.z_dim))
    t5 = T5Encoder(spec.t5_config(vocab))
    return DiTWithText(dit, t5)


def _built_at_first_call(make: Callable[[], LossFn]) -> LossFn:
    """A loss function built (and its latent set loaded) at its first call only: resuming a
    finished cycle loads no data."""
    built: list[LossFn] = []

    def loss_fn(step: int, gen: torch.Generator):
        if not built:
            built.append(make())
        return built[0](step, gen)
    return loss_fn


def make_dit_loss_fn(model, spec, seed: int, tokenizer, latents: torch.Tensor, specs: list[list[str]],
                     cycle: int = 1, shapes: dict | None = None, keyframes: dict | None = None):
    """Loss of step `step`: a batch of stored latents with freshly drawn caption paraphrases
    (every cosine cycle draws its own batches), plus `spec.image_batch` text-to-image samples,
    `spec.pair_batch` shape pairs from the shape set `shapes` and `spec.keyframe_batch`
    text-to-image samples from the larger shape set `keyframes` (`encode_shape_set`)."""
    from .data import caption_for_row
    from .dit_train import flow_loss, pair_loss

    if spec.pair_batch and shapes is None:
        raise ValueError("pair_batch needs a shape set (encode_shape_set)")
    if spec.keyframe_batch and keyframes is None:
        raise ValueError("keyframe_batch needs a shape set at the keyframe scale (encode_shape_set)")
    image_spec = replace(spec, p_image=0.0)

    def tokens(captions: list[str]):
        ids, mask = tokenizer(captions, max_length=spec.text_len)
        longest = int(mask.sum(dim=1).max())
        return ids[:, :longest], mask[:, :longest]

    def batch(rng: np.random.Generator, n: int, frames: int | None):
        idx = rng.integers(0, latents.shape[0], size=n)
        captions = [caption_for_row(specs[int(i)], rng) for i in idx]
        z = latents[torch.from_numpy(idx)]
        if frames is not None:
            z = z[:, :, :frames]
        return (z.float(), *tokens(captions))

    pairable = None if shapes is None else torch.nonzero(shapes["valid"].sum(1) >= 2)[:, 0].numpy()

    def pairs(rng: np.random.Generator, n: int):
        # scene i as shapes a != b (both captions allowed), captions of one paraphrase draw
        idx = rng.choice(pairable, size=n)
        a, b, captions_a, captions_b = [], [], [], []
        for i in idx:
            ka, kb = rng.choice(np.flatnonzero(shapes["valid"][i].numpy()), size=2, replace=False)
            draw = int(rng.integers(0, 2**31))
            a.append(int(ka))
            b.append(int(kb))
            captions_a.append(caption_for_row(shapes["specs"][i], np.random.default_rng(draw), shapes["shapes"][ka]))
            captions_b.append(caption_for_row(shapes["specs"][i], np.random.default_rng(draw), shapes["shapes"][kb]))
        rows = torch.from_numpy(idx)
        z = shapes["latents"]
        return (z[rows, torch.tensor(a)].float(), z[rows, torch.tensor(b)].float(),
                *tokens(captions_a + captions_b))

    # keyframes: every (scene, shape) whose caption is allowed, each drawn with equal chance
    framable = None if keyframes is None else torch.nonzero(keyframes["valid"])  # [M, 2]

    def keyframe_batch(rng: np.random.Generator, n: int):
        pick = framable[torch.from_numpy(rng.integers(0, framable.shape[0], size=n))]
        captions = [caption_for_row(keyframes["specs"][i], rng, keyframes["shapes"][k]) for i, k in pick.tolist()]
        return (keyframes["latents"][pick[:, 0], pick[:, 1]].float(), *tokens(captions))

    def loss_fn(step: int, gen: torch.Generator):
        rng = np.random.default_rng([seed, 11, step] if cycle == 1 else [seed, 11, cycle, step])
        loss, logs = flow_loss(model, spec, *batch(rng, spec.batch, None), gen)
        if spec.image_batch or spec.pair_batch or spec.keyframe_batch:
            logs = {"video": float(loss.detach())}
        if spec.image_batch:
            image_loss, _ = flow_loss(model, image_spec, *batch(rng, spec.image_batch, 1), gen)
            logs["image"] = float(image_loss.detach())
            loss = loss + image_loss
        if spec.pair_batch:
            extra_loss, extra = pair_loss(model, spec, *pairs(rng, spec.pair_batch), gen)
            logs.update(extra)
            loss = loss + extra_loss
        if spec.keyframe_batch:
            keyframe_loss, _ = flow_loss(model, image_spec, *keyframe_batch(rng, spec.keyframe_batch), gen)
            logs["keyframe"] = float(keyframe_loss.detach())
            loss = loss + keyframe_loss
        return loss, logs
    return loss_fn


def train_dit(work: Path, recipe: Recipe, log: Log, progress: bool = True) -> Path:
    from ..tokenizer import UMT5Tokenizer

    final = work / "dit.pt"
    if final.is_file():
        log("dit exists, skipped")
        return final
    tokenizer = UMT5Tokenizer.from_dir(work / "tokenizer")
    torch.manual_seed(recipe.seed)
    model = build_dit_and_text(recipe, tokenizer.vocab_size)
    log(f"dit: {sum(p.numel() for p in model.dit.parameters()) / 1e6:.2f}M + text "
        f"{sum(p.numel() for p in model.t5.parameters()) / 1e6:.2f}M parameters")

    latent_set = _latent_loader(work, recipe, log)

    def loss_fn_of(model, spec, layout: Layout, cycle: int) -> LossFn:
        def make() -> LossFn:
            data = latent_set(layout)

            def shape_set(scale: int) -> dict:
                path = shapes_path(work, layout, scale)
                loaded = torch.load(path, map_location="cpu", weights_only=True)
                log(f"{loaded['latents'].shape[0]} scenes x {len(loaded['shapes'])} shapes from {path.name}")
                return loaded
            shapes = shape_set(1) if spec.pair_batch else None
            keyframes = shape_set(spec.keyframe_scale) if spec.keyframe_batch else None
            return make_dit_loss_fn(model, spec, recipe.seed, tokenizer, data["latents"], data["specs"], cycle,
                                    shapes, keyframes)
        return _built_at_first_call(make)

    loss_fn = loss_fn_of(model, recipe.dit, recipe.layout, 1)
    trainer = Trainer(model, loss_fn, recipe.dit_optim, checkpoint=work / "dit_ckpt.pt", name="dit", log=log)
    trainer.maybe_resume()
    trainer.run(progress=progress)
    log(f"dit: cycle 1 final loss {trainer.recent_loss(100)}")
    for n, cycle in enumerate(recipe.dit_more, start=2):
        previous = trainer
        spec = replace(recipe.dit, batch=cycle.batch or recipe.dit.batch, p_image=cycle.p_image,
                       image_batch=cycle.image_batch, pair_batch=cycle.pair_batch, pair_weight=cycle.pair_weight,
                       keyframe_batch=cycle.keyframe_batch, keyframe_scale=cycle.keyframe_scale)
        deepen = cycle.num_layers is not None and cycle.num_layers != model.dit.cfg.num_layers
        if deepen:
            from .dit_train import DiTWithText, deepen_dit

            model.load_state_dict(previous.ema_state())
            model = DiTWithText(deepen_dit(model.dit, cycle.num_layers), model.t5)
            log(f"dit: deepened to {cycle.num_layers} blocks ({model.dit.num_params() / 1e6:.2f}M parameters)")
        trainer = Trainer(model, loss_fn_of(model, spec, cycle.layout or recipe.layout, n),
                          cycle.optim, checkpoint=work / f"dit_ckpt{n}.pt", name=f"dit{n}", log=log)
        # a deepened DiT starts a fresh optimizer (the old moments miss the new blocks)
        if not trainer.maybe_resume() and not deepen:
            trainer.warm_start(previous.state_dict())
        trainer.run(until=cycle.stop_at, progress=progress)
        log(f"dit: cycle {n} stopped at step {trainer.step}, loss {trainer.recent_loss(100)}")
    torch.save(trainer.ema_state(), final)
    return final


def sampling_defaults(recipe: Recipe) -> dict:
    return {
        "name": "kinema-builtin",
        "defaults": {
            "size": [recipe.size, recipe.size],
            "frames": recipe.frames,
            "fps": recipe.fps,
            "steps": 12,
            # chosen on 12 training combinations x 2 seeds (image first): shape 0.33 / 0.46 /
            # 0.50 / 0.54 at guidance 2 / 3.5 / 5 / 8, colour and direction falling past 5
            "guidance": 5.0,
            "shift": recipe.dit.shift,
            "sampler": "unipc",
            "negative_prompt": "",
            # text-to-video as an image first, then image-to-video from it: the small model
            # follows a first frame far better than it lays out a whole clip from text alone
            "image_first": True,
            "image_first_scale": recipe.image_first_scale,
        },
    }


def export(work: Path, recipe: Recipe, out: Path, log: Log) -> Path:
    """Write the official folder layout: config.json + diffusion_pytorch_model.safetensors (DiT),
    Wan2.2_VAE.pth, models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/ and kinema.json."""
    import shutil

    from safetensors.torch import save_file

    from ..tokenizer import UMT5Tokenizer

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = UMT5Tokenizer.from_dir(work / "tokenizer")
    state = torch.load(work / "dit.pt", map_location="cpu", weights_only=True)
    dit = {k[len("dit."):]: v for k, v in state.items() if k.startswith("dit.")}
    t5 = {k[len("t5."):]: v for k, v in state.items() if k.startswith("t5.")}
    save_file({k: v.half().contiguous() for k, v in dit.items()}, str(out / "diffusion_pytorch_model.safetensors"))
    cfg = final_dit_spec(recipe).dit_config(recipe.vae.z_dim)
    config = {"__name__": "Config", "_class_name": "WanModel", "model_type": cfg.model_type,
              "dim": cfg.dim, "ffn_dim": cfg.ffn_dim, "freq_dim": cfg.freq_dim, "in_dim": cfg.in_dim,
              "out_dim": cfg.out_dim, "num_heads": cfg.num_heads, "num_layers": cfg.num_layers,
              "text_len": cfg.text_len, "eps": cfg.eps}
    (out / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    vae = torch.load(_decoder_path(work), map_location="cpu", weights_only=True)
    torch.save({k: v.half().contiguous() for k, v in vae.items()}, out / "Wan2.2_VAE.pth")
    # the text encoder is tiny: float32 keeps its features exactly as trained
    torch.save({k: v.float().contiguous() for k, v in t5.items()}, out / "models_t5_umt5-xxl-enc-bf16.pth")
    tok_dir = out / "google" / "umt5-xxl"
    tok_dir.mkdir(parents=True, exist_ok=True)
    for f in (work / "tokenizer").iterdir():
        shutil.copy2(f, tok_dir / f.name)
    (out / "kinema.json").write_text(json.dumps(sampling_defaults(recipe), indent=1), encoding="utf-8")
    log(f"export: {out} (vocab {tokenizer.vocab_size})")
    return out


def tune_decoder(work: Path, recipe: Recipe, log: Log, progress: bool = True) -> Path:
    """Fine-tune conv2 + decoder on latents of the frozen encoder; writes vae_tuned.pt."""
    from .vae_train import make_decoder_loss_fn

    final = work / "vae_tuned.pt"
    if final.is_file():
        log("tuned decoder exists, skipped")
        return final
    vae = load_trained_vae(work, recipe)
    vae.requires_grad_(False)
    vae.conv2.requires_grad_(True)
    vae.decoder.requires_grad_(True)
    latent_set = _latent_loader(work, recipe, log)

    def loss_fn_of(vae, spec, layout: Layout, cycle: int) -> LossFn:
        def make() -> LossFn:
            latents = latent_set(layout)["latents"]
            return make_decoder_loss_fn(vae, spec, latents, recipe.seed, recipe.seed + 3000, recipe.size,
                                        recipe.frames, cycle=cycle, layout=layout)
        return _built_at_first_call(make)

    trainer = Trainer(vae, loss_fn_of(vae, recipe.decoder, recipe.layout, 1),
                      recipe.decoder_optim, checkpoint=work / "decoder_ckpt.pt", name="decoder", log=log)
    trainer.maybe_resume()
    trainer.run(progress=progress)
    for n, cycle in enumerate(recipe.decoder_more, start=2):
        log(f"decoder: cycle {n - 1} final loss {trainer.recent_loss(50)}")
        previous = trainer
        widen = cycle.dec_dim is not None and cycle.dec_dim != (vae.cfg.dec_dim or vae.cfg.dim)
        if widen:
            from ..models.vae import WanVAE
            from .vae_train import widen_decoder

            vae.load_state_dict(previous.ema_state())
            vae = widen_decoder(vae, WanVAE(replace(vae.cfg, dec_dim=cycle.dec_dim)), seed=recipe.seed + n)
            vae.eval().requires_grad_(False)
            vae.conv2.requires_grad_(True)
            vae.decoder.requires_grad_(True)
            log(f"decoder: widened to dec_dim {cycle.dec_dim} "
                f"({sum(p.numel() for p in vae.decoder.parameters()) / 1e6:.1f}M parameters)")
        trainer = Trainer(vae, loss_fn_of(vae, cycle.spec, cycle.layout or recipe.layout, n), cycle.optim,
                          checkpoint=work / f"decoder_ckpt{n}.pt", name=f"decoder{n}", log=log)
        # a widened decoder starts a fresh optimizer (the old moments have the old shapes)
        if not trainer.maybe_resume() and not widen:
            trainer.warm_start(previous.state_dict())
        trainer.run(progress=progress)
    vae.load_state_dict(trainer.ema_state())
    torch.save(vae.state_dict(), final)
    log(f"decoder: final loss {trainer.recent_loss(50)}")
    return final


def _decoder_path(work: Path) -> Path:
    """The latest VAE of the work folder: adapted, else tuned, else as trained."""
    for name in ("vae_adapted.pt", "vae_tuned.pt"):
        if (work / name).is_file():
            return work / name
    return _vae_path(work)


def adapted_path(work: Path, layout: Layout) -> Path:
    return work / f"adapted_{_layout_tag(layout)}.pt"


def regenerate_latents(work: Path, recipe: Recipe, log: Log, progress: bool = True,
                       latent_set: Callable[[Layout], dict] | None = None) -> Path:
    """The first `recipe.adapt.clips` clips of the `adapt_layout` latent set, regenerated by
    the trained DiT (`adapt.regenerate`) at the model's sampling defaults."""
    from tqdm import tqdm

    from ..tokenizer import UMT5Tokenizer
    from .adapt import regenerate

    final = adapted_path(work, recipe.adapt_layout)
    if final.is_file():
        log(f"{final.name} exists, skipped")
        return final
    spec = recipe.adapt
    tokenizer = UMT5Tokenizer.from_dir(work / "tokenizer")
    model = build_dit_and_text(recipe, tokenizer.vocab_size, final=True)
    model.load_state_dict(torch.load(work / "dit.pt", map_location="cpu", weights_only=True))
    model.eval().requires_grad_(False)
    data = (latent_set or _latent_loader(work, recipe, log))(recipe.adapt_layout)
    n = min(spec.clips, data["latents"].shape[0])
    d = sampling_defaults(recipe)["defaults"]
    with tqdm(total=n, desc="regenerate", disable=not progress, mininterval=5.0) as bar:
        z = regenerate(model, tokenizer, data["latents"][:n], data["specs"][:n], spec, steps=d["steps"],
                       shift=d["shift"], guidance=d["guidance"], sampler=d["sampler"], seed=recipe.seed,
                       text_len=recipe.dit.text_len, progress=bar.update)
    _save_atomically({"latents": z}, final)
    log(f"{final.name}: {tuple(z.shape)} regenerated from sigma {spec.strength[0]:g}-{spec.strength[1]:g}")
    return final


def adapt_decoder(work: Path, recipe: Recipe, log: Log, progress: bool = True) -> Path | None:
    """Tune the decoder on regenerated latents as well as encoder ones (`adapt.py`); writes
    vae_adapted.pt. Needs the `dit` step's result."""
    from .adapt import make_adapt_loss_fn

    final = work / "vae_adapted.pt"
    if recipe.adapt is None:
        log("no decoder adaptation in this recipe, skipped")
        return None
    if final.is_file():
        log("adapted decoder exists, skipped")
        return final
    if not (work / "dit.pt").is_file():
        from ..errors import InputError

        raise InputError(f"the adapt step needs the dit step's result {work / 'dit.pt'}; run `--steps dit` first")
    from ..models.vae import WanVAE

    latent_set = _latent_loader(work, recipe, log)
    adapted = torch.load(regenerate_latents(work, recipe, log, progress, latent_set), map_location="cpu",
                         weights_only=True)["latents"]
    cfg = recipe.vae.vae_config()
    for cycle in recipe.decoder_more:  # the decoder as the last widening left it
        cfg = replace(cfg, dec_dim=cycle.dec_dim or cfg.dec_dim)
    vae = WanVAE(cfg)
    vae.load_state_dict(torch.load(_decoder_path(work), map_location="cpu", weights_only=True))
    vae.eval().requires_grad_(False)
    vae.conv2.requires_grad_(True)
    vae.decoder.requires_grad_(True)
    latents = latent_set(recipe.adapt_layout)["latents"]
    loss_fn = make_adapt_loss_fn(vae, recipe.adapt, latents, adapted, recipe.seed, recipe.seed + 3000,
                                 recipe.size, recipe.frames, recipe.adapt_layout)
    trainer = Trainer(vae, loss_fn, recipe.adapt_optim, checkpoint=work / "adapt_ckpt.pt", name="adapt", log=log)
    trainer.maybe_resume()
    trainer.run(progress=progress)
    vae.load_state_dict(trainer.ema_state())
    torch.save(vae.state_dict(), final)
    log(f"adapt: final loss {trainer.recent_loss(50)}")
    return final
