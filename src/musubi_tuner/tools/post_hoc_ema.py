"""Post-hoc EMA of one run's LoRA checkpoints (musubi-tuner's lora_post_hoc_ema.py): a smoother LoRA from the
checkpoints a run saved, without training again.

The files, oldest first (by modification time unless --no_sort), are averaged as an EMA over the checkpoint index:
w <- beta_i * w + (1 - beta_i) * w_i for i = 1..n-1, starting from the first file, where beta_i is
- `--beta` for every file, or linear from `--beta` to `--beta2` over the files; or
- with `--sigma_rel`, the power-function EMA of Karras et al. (arXiv 2312.02696, Algorithm 2): gamma solves
  gamma^3 + 7 gamma^2 + (16 - sigma_rel^-2) gamma + (12 - sigma_rel^-2) = 0, and beta_t = (1 - 1/t)^(gamma + 1).

Every float tensor is averaged in float32 and written back in its own dtype; `alpha` tensors must agree between files
(they are kept); the metadata is the newest file's, with its kohya hashes (sshs_*) recomputed and the EMA settings
recorded (`post_hoc_ema`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ..errors import UserError
from ..fileio import check_writable_folder, save_safetensors

logger = logging.getLogger(__name__)


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of the power-function EMA with relative standard deviation sigma_rel (Algorithm 2)."""
    t = sigma_rel ** -2
    roots = np.roots([1, 7, 16 - t, 12 - t])
    real = roots[np.isreal(roots) & (roots.real >= 0)].real
    if real.size == 0:
        raise UserError(f"--sigma_rel {sigma_rel}: no power-function EMA has this width; use a value between 0.01 and "
                        "0.28 (0.05 to 0.2 are usual)")
    return float(real.max())


def betas(n_files: int, beta: float, beta2: float, sigma_rel: float | None) -> list[float]:
    """beta for each file after the first."""
    count = n_files - 1
    if sigma_rel is not None:
        gamma = sigma_rel_to_gamma(sigma_rel)
        return [(1 - 1 / t) ** (gamma + 1) for t in range(1, count + 1)]
    return [beta + (beta2 - beta) * (i / (count - 1)) if count > 1 else beta for i in range(count)]


def check_inputs(paths: list[str], beta: float, beta2: float | None, sigma_rel: float | None, output: str) -> None:
    """Everything checkable before any tensor is read."""
    from ..qwen_image.model_files import expect

    if len(paths) < 2:
        raise UserError("give at least two LoRA checkpoints of one run (e.g. OUT/name-step*.safetensors)")
    for option, value in (("--beta", beta), ("--beta2", beta2)):
        if value is not None and not (math.isfinite(value) and 0 <= value <= 1):
            raise UserError(f"{option} {value} must be between 0 and 1 (0.9 to 0.999 are usual)")
    if sigma_rel is not None:
        if not (math.isfinite(sigma_rel) and sigma_rel > 0):
            raise UserError(f"--sigma_rel {sigma_rel} must be > 0 (0.05 to 0.2 are usual)")
        sigma_rel_to_gamma(sigma_rel)
    out = Path(output)
    if out.suffix != ".safetensors":
        raise UserError(f"--output_file {output}: give a .safetensors file name")
    for p in paths:
        expect(p, "LoRA file", "lora")
        if out.exists() and os.path.samefile(p, out):
            raise UserError(f"--output_file {output} is one of the input files; write to a new file")
    check_writable_folder(out.parent if str(out.parent) else Path("."), "--output_file")


def post_hoc_ema(paths: list[str], output: str, beta: float = 0.95, beta2: float | None = None,
                 sigma_rel: float | None = None, no_sort: bool = False) -> Path:
    check_inputs(paths, beta, beta2, sigma_rel, output)
    paths = list(paths) if no_sort else sorted(paths, key=os.path.getmtime)
    weights = betas(len(paths), beta, beta if beta2 is None else beta2, sigma_rel)
    with safe_open(paths[-1], "pt") as f:
        metadata = dict(f.metadata() or {})
    with safe_open(paths[0], "pt") as f:
        first = {k: f.get_tensor(k) for k in f.keys()}
    dtypes = {k: v.dtype for k, v in first.items()}
    state = {k: v.float() if v.is_floating_point() else v for k, v in first.items()}
    for path in paths[1:]:  # the files belong together: same weights, shapes and alphas (before any work)
        with safe_open(path, "pt") as f:
            keys = set(f.keys())
            if keys != set(state):
                extra, missing = sorted(keys - set(state)), sorted(set(state) - keys)
                raise UserError(f"{path} has other weights than {paths[0]} ({len(missing)} missing, {len(extra)} "
                                f"extra, e.g. {(missing + extra)[0]}): give the checkpoints of one run")
            for k in sorted(keys):
                shape = tuple(f.get_slice(k).get_shape())
                if shape != tuple(state[k].shape):
                    raise UserError(f"{path}: {k} is {shape} there but {tuple(state[k].shape)} in {paths[0]}: give "
                                    "the checkpoints of one run")
                if k.endswith(".alpha") and not torch.allclose(state[k].float(), f.get_tensor(k).float()):
                    raise UserError(f"{path}: {k} differs from {paths[0]}: give the checkpoints of one run")
    for path, b in tqdm(list(zip(paths[1:], weights)), desc="post-hoc EMA", unit="file"):
        with safe_open(path, "pt") as f:
            for k in f.keys():
                if k.endswith(".alpha") or not state[k].is_floating_point():
                    continue
                state[k] = state[k] * b + f.get_tensor(k).float() * (1 - b)
        logger.debug("merged %s with beta %.6f", path, b)
    state = {k: v.to(dtypes[k]) for k, v in state.items()}
    if metadata:
        from ..networks.lora_files import safetensors_hashes

        metadata["sshs_model_hash"], metadata["sshs_legacy_hash"] = safetensors_hashes(state, metadata)
    metadata["post_hoc_ema"] = json.dumps({
        "files": [Path(p).name for p in paths], "beta": beta, "beta2": beta2, "sigma_rel": sigma_rel,
        "betas": [round(b, 8) for b in weights]})
    out = save_safetensors(state, output, metadata)
    print(f"post-hoc EMA of {len(paths)} checkpoints written to {out}")
    return out
