"""A small generic training loop: AdamW, warmup + cosine LR, gradient clipping, EMA weights,
checkpoint/resume and a logged loss with a progress bar.

Batches must be a pure function of (seed, step) (see `step_generator`), so a run resumed from
a checkpoint continues exactly like the uninterrupted run: the checkpoint holds the model, EMA,
optimizer state, step and loss history, and nothing else is needed.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

LossFn = Callable[[int, torch.Generator], tuple[Tensor, dict[str, float]]]


@dataclass(frozen=True)
class OptimConfig:
    steps: int
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.99)
    warmup: int = 50
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    checkpoint_every: int = 100
    log_every: int = 10
    seed: int = 0
    # bfloat16 autocast of the forward (AVX512-BF16 CPUs run the matmuls ~1.4x faster; other
    # CPUs emulate bf16 far slower, so `run.with_precision` turns it off there);
    # weights, optimizer state and the loss reduction stay float32
    bf16: bool = False


def step_generator(seed: int, step: int) -> torch.Generator:
    """The torch random stream of one training step (independent of any earlier step)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def lr_at(cfg: OptimConfig, step: int) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr_ratio * lr` at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(cfg.steps - cfg.warmup, 1)
    progress = min((step - cfg.warmup) / span, 1.0)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class Trainer:
    """Trains `model` on `loss_fn(step, generator) -> (loss, logs)` for `cfg.steps` steps."""

    def __init__(self, model: nn.Module, loss_fn: LossFn, cfg: OptimConfig, checkpoint: Path | None = None,
                 name: str = "train", log: Callable[[str], None] | None = None) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.cfg = cfg
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.name = name
        self.log = log or (lambda msg: None)
        params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]  # norms, biases, modulation rows
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=cfg.betas,
        )
        self.ema = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.step = 0
        self.history: list[float] = []
        self._parts: list[dict[str, float]] = []  # the loss parts since the last log line

    # -- state ----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema,
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "history": list(self.history),
            "config": asdict(self.cfg),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.ema = {k: v.clone() for k, v in state["ema"].items()}
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.history = list(state["history"])

    def save(self) -> None:
        if self.checkpoint is None:
            return
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint.with_suffix(".tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(self.checkpoint)  # atomic: a crash never leaves a half-written checkpoint

    def warm_start(self, state: dict) -> None:
        """Start a new schedule (step 0) from another run's weights, EMA and optimizer moments."""
        self.model.load_state_dict(state["model"])
        self.ema = {k: v.clone() for k, v in state["ema"].items()}
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # the new schedule owns the hyperparameters
            group["lr"] = self.cfg.lr
            group["betas"] = self.cfg.betas
        self.step = 0
        self.history = []

    def maybe_resume(self) -> bool:
        """Load the checkpoint when it exists; returns whether it did."""
        if self.checkpoint is None or not self.checkpoint.is_file():
            return False
        self.load_state_dict(torch.load(self.checkpoint, map_location="cpu", weights_only=True))
        self.log(f"[{self.name}] resumed at step {self.step}")
        return True

    def ema_state(self) -> dict[str, Tensor]:
        return {k: v.clone() for k, v in self.ema.items()}

    # -- loop -----------------------------------------------------------------------------

    def train_step(self) -> float:
        cfg = self.cfg
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(cfg, self.step)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss, logs = self.loss_fn(self.step, step_generator(cfg.seed, self.step))
        loss = loss.float()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        # EMA with a short warmup so early weights do not dominate
        decay = min(cfg.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                if v.dtype.is_floating_point:
                    self.ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
                else:
                    self.ema[k].copy_(v)
        self.step += 1
        value = float(loss.detach())
        self.history.append(value)
        self._parts.append(logs)
        return value

    def _mean_parts(self) -> str:
        """The loss function's named parts (its `logs`) averaged since the last log line."""
        recent = [p for p in self._parts[-self.cfg.log_every:] if p]
        self._parts.clear()
        if not recent:
            return ""
        return " (" + ", ".join(f"{k} {np.mean([p[k] for p in recent if k in p]):.4f}" for k in recent[0]) + ")"

    def recent_loss(self, n: int) -> str:
        """Mean of the last `n` logged losses, as log text ("none logged" for a checkpoint that
        holds no history, e.g. one written without training)."""
        recent = self.history[-n:]
        return f"{np.mean(recent):.5f}" if recent else "none logged"

    def run(self, until: int | None = None, progress: bool = True) -> list[float]:
        """Train up to step `until` (default: cfg.steps), checkpointing on the way."""
        from tqdm import tqdm

        end = self.cfg.steps if until is None else min(until, self.cfg.steps)
        bar = tqdm(total=end, initial=self.step, desc=self.name, disable=not progress, mininterval=5.0)
        start = time.time()
        while self.step < end:
            value = self.train_step()
            bar.update(1)
            if self.step % self.cfg.log_every == 0 or self.step == end:
                recent = self.history[-self.cfg.log_every:]
                avg = sum(recent) / len(recent)
                bar.set_postfix(loss=f"{avg:.4f}")
                self.log(f"[{self.name}] step {self.step}/{end} loss {avg:.5f}{self._mean_parts()} "
                         f"lr {lr_at(self.cfg, self.step - 1):.2e} {time.time() - start:.0f}s")
            if self.step % self.cfg.checkpoint_every == 0 or self.step == end:
                self.save()
        bar.close()
        return self.history
