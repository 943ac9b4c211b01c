"""The validation loss: the training loss on held-out items, at fixed sigmas with fixed noise.

Every pass uses the same noise for each (item, sigma), drawn from generators seeded by --validation_seed and the
item's cache name (never the global RNG, so training randomness is untouched and a resumed run continues the same
curves). Each item is one forward pass of a batch of S copies at the S sigmas; with several processes each takes every
N-th item and the per-sigma sums are reduced once. Reported: the loss at each sigma, their mean, and the mean relative
to the run's first pass.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
import torch

from ..dataset.loader import CachedItem, load_items
from ..errors import UserError
from ..models.registry import family_of
from .loss import per_sample_loss
from .outputs import LossLog
from .timesteps import sample_t, timestep_options

logger = logging.getLogger(__name__)

DEFAULT_QUANTILES = (0.1, 0.3, 0.5, 0.7, 0.9)


def default_sigmas(args, image_seq_len: int) -> list[float]:
    """Quantiles 10/30/50/70/90 % of the t distribution training draws from (the same options, 100k samples)."""
    g = torch.Generator().manual_seed(0)
    t = sample_t(args.timestep_sampling, 100_000, g, **timestep_options(args, image_seq_len))
    return [round(float(q), 3) for q in torch.quantile(t, torch.tensor(DEFAULT_QUANTILES))]


def validation_seed(args) -> int:
    """--validation_seed, else --seed: which items a split holds out and the noise of every pass."""
    return args.seed if args.validation_seed is None else args.validation_seed


def check_validation_options(args) -> None:
    for option in ("validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps"):
        value = getattr(args, option, None)
        if value is not None and value < 1:
            raise UserError(f"--{option} {value} must be at least 1")
    if not 0 <= args.validation_split < 1:
        raise UserError(f"--validation_split {args.validation_split} must be in [0, 1)")
    for s in args.validation_sigmas or []:
        if not 0 < s <= 1:
            raise UserError(f"--validation_sigmas: {s} is outside (0, 1] (sigma = t / 1000)")


@dataclass
class Validator:
    """Runs passes over the held-out items and reports them (log file, trackers, console)."""

    items: list[CachedItem]
    sigmas: list[float]
    seed: int
    log: LossLog | None = None  # main process only
    first: float | None = None  # mean of the run's first pass (relative figures)
    history: list[dict] = field(default_factory=list)  # this process's view of every pass of this run

    @staticmethod
    def columns(sigmas: list[float]) -> list[str]:
        return ["step", "epoch", "mean", "relative", *[f"sigma_{s:g}" for s in sigmas]]

    def noise(self, item: CachedItem, shape: tuple[int, ...]) -> torch.Tensor:
        """(S, *shape): the same noise for this item and each sigma at every pass."""
        key = zlib.crc32(item.latent_path.name.encode())
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(
            (self.seed * 1_000_003 + key) * 101 + k)) for k in range(len(self.sigmas))])

    @torch.no_grad()
    def run(self, model, version, args, accelerator, device, dtype, step: int, epoch: int) -> dict:
        """One pass (every process takes its share); returns and reports {"mean", "relative", "sigmas"}."""
        was_training = model.training
        model.eval()
        mine = self.items[accelerator.process_index::accelerator.num_processes]
        sums = torch.zeros(len(self.sigmas) + 1, dtype=torch.float64)
        t = torch.tensor(self.sigmas, dtype=torch.float32)
        for item in mine:
            batch = load_items([item], copies=len(self.sigmas))
            x0, _ = family_of(version).target_latents(batch, version, args)
            with accelerator.autocast():
                losses = per_sample_loss(model, batch, version, args, t, self.noise(item, tuple(x0.shape[1:])),
                                         device, dtype)
            sums[:-1] += losses.double().cpu()
            sums[-1] += 1
        if was_training:
            model.train()
        if accelerator.num_processes > 1:
            sums = accelerator.reduce(sums.to(device), reduction="sum").cpu()
        per_sigma = (sums[:-1] / sums[-1].clamp(min=1)).tolist()
        mean = sum(per_sigma) / len(per_sigma)
        if self.first is None:
            self.first = mean
        result = {"mean": mean, "relative": mean / self.first if self.first else 1.0,
                  "sigmas": dict(zip(self.sigmas, per_sigma))}
        self.history.append({"step": step, "epoch": epoch, **result})
        if accelerator.is_main_process:
            parts = " ".join(f"{s:g}:{v:.4f}" for s, v in result["sigmas"].items())
            logger.info("validation at step %d: mean %.4f (x%.3f of the first pass); by sigma %s", step, mean,
                        result["relative"], parts)
            if self.log is not None:
                self.log.append({"step": step, "epoch": epoch, "mean": f"{mean:.6f}",
                                 "relative": f"{result['relative']:.6f}",
                                 **{f"sigma_{s:g}": f"{v:.6f}" for s, v in result["sigmas"].items()}})
        accelerator.log({"val/mean": mean, "val/relative": result["relative"],
                         **{f"val/sigma_{s:g}": v for s, v in result["sigmas"].items()}}, step=step)
        return result

    def resume(self) -> None:
        """After --resume: the first pass's mean from the log, so relative figures continue."""
        if self.log is not None:
            rows = self.log.rows()
            if rows:
                self.first = float(rows[0]["mean"])
