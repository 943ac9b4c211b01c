"""What one generation is (`GenerationSpec`) and the prompt-line syntax shared by --from_file and --sample_prompts:

    a cat on a roof --w 1024 --h 768 --d 42 --s 25 --g 4.0 --fs 2.2 --n blurry, low quality --ci ref.png

--w/--h size, --d seed, --s steps, --g/--l guidance scale, --fs flow shift, --n negative prompt,
--ci control image (repeatable), --f output layers (layered),
--rcm_th / --rcm_rel_th RCM absolute / relative threshold, --rcm_ks kernel size, --rcm_ds dilate size.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError


@dataclass
class GenerationSpec:
    prompt: str
    negative_prompt: str | None = None
    height: int | None = 1024  # None: from the first control image (edit / layered)
    width: int | None = 1024
    steps: int = 25
    guidance_scale: float = 4.0
    flow_shift: float | None = None
    seed: int | None = None
    control_images: list[str] = field(default_factory=list)
    output_layers: int | None = None
    rcm_threshold: float | None = None
    rcm_relative: bool = False
    rcm_kernel_size: int = 3
    rcm_dilate_size: int = 0

    def resolved_seed(self) -> int:
        if self.seed is None:
            self.seed = random.randint(0, 2**32 - 1)
        return self.seed


_LINE_OPTIONS = {
    "w": ("width", int), "h": ("height", int), "d": ("seed", int), "s": ("steps", int),
    "g": ("guidance_scale", float), "l": ("guidance_scale", float), "fs": ("flow_shift", float),
    "n": ("negative_prompt", str), "ci": ("control_images", str), "f": ("output_layers", int),
    "rcm_th": ("rcm_threshold", float), "rcm_rel_th": ("rcm_threshold", float), "rcm_ks": ("rcm_kernel_size", int),
    "rcm_ds": ("rcm_dilate_size", int),
}


def parse_prompt_line(line: str, defaults: GenerationSpec, where: str = "prompt line") -> GenerationSpec:
    parts = (" " + line.strip()).split(" --")
    spec = dataclasses.replace(defaults, prompt=parts[0].strip(), control_images=list(defaults.control_images))
    given_ci = False
    for part in parts[1:]:
        key, _, value = part.partition(" ")
        if key not in _LINE_OPTIONS:
            raise UserError(f"{where}: unknown option --{key} (known: {', '.join('--' + k for k in _LINE_OPTIONS)})")
        attr, conv = _LINE_OPTIONS[key]
        value = value.strip()
        try:
            v = conv(value)
        except ValueError:
            raise UserError(f"{where}: --{key} needs a {conv.__name__}, got {value!r}") from None
        if attr == "control_images":
            if not given_ci:
                spec.control_images, given_ci = [], True
            spec.control_images.append(v)
        else:
            setattr(spec, attr, v)
            if key in ("rcm_th", "rcm_rel_th"):
                spec.rcm_relative = key == "rcm_rel_th"
    if not spec.prompt:
        raise UserError(f"{where}: empty prompt")
    return spec


LINE_NAMES = {"height": "--h", "width": "--w", "steps": "--s", "guidance_scale": "--g", "flow_shift": "--fs",
              "seed": "--d", "output_layers": "--f", "rcm_threshold": "--rcm_th", "rcm_kernel_size": "--rcm_ks",
              "rcm_dilate_size": "--rcm_ds", "control_images": "--ci"}
CLI_NAMES = {"height": "--image_size", "width": "--image_size", "steps": "--infer_steps",
             "guidance_scale": "--guidance_scale", "flow_shift": "--flow_shift", "seed": "--seed",
             "output_layers": "--output_layers", "rcm_threshold": "--rcm_threshold",
             "rcm_kernel_size": "--rcm_kernel_size", "rcm_dilate_size": "--rcm_dilate_size",
             "control_images": "--control_image_path"}
MAX_SEED = 2**64 - 1


def check_spec(spec: GenerationSpec, where: str = "", names: dict[str, str] = CLI_NAMES) -> None:
    """Value ranges of one generation, checked before any model loads; `names` are the option spellings of where
    the values came from (the command line or a prompt-file line)."""
    import math

    prefix = f"{where}: " if where else ""

    def bad(attr: str, value, rule: str):
        raise UserError(f"{prefix}{names[attr]} {value} {rule}")

    h, w = spec.height, spec.width
    if any(v is not None and (v <= 0 or v % 16) for v in (h, w)):
        def fix(v):
            return max(16, round(v / 16) * 16)

        if names["height"] == names["width"]:  # --image_size H W
            raise UserError(f"{prefix}{names['height']} {h} {w}: height and width must be positive multiples of 16; "
                            f"try {fix(h)} {fix(w)}")
        attr = "height" if h is not None and (h <= 0 or h % 16) else "width"
        v = getattr(spec, attr)
        bad(attr, v, f"must be a positive multiple of 16 (try {fix(v)})")
    if spec.steps < 1:
        bad("steps", spec.steps, "must be at least 1")
    if not math.isfinite(spec.guidance_scale) or spec.guidance_scale < 0:
        bad("guidance_scale", spec.guidance_scale, "must be >= 0 (1 disables CFG)")
    if spec.flow_shift is not None and not (math.isfinite(spec.flow_shift) and spec.flow_shift > 0):
        bad("flow_shift", spec.flow_shift, "must be > 0 (leave it out for the dynamic shift by image size)")
    if spec.seed is not None and not 0 <= spec.seed <= MAX_SEED:
        bad("seed", spec.seed, f"must be between 0 and {MAX_SEED}")
    if spec.output_layers is not None and spec.output_layers < 1:
        bad("output_layers", spec.output_layers, "must be at least 1")
    if spec.rcm_threshold is not None and not (math.isfinite(spec.rcm_threshold) and spec.rcm_threshold >= 0):
        bad("rcm_threshold", spec.rcm_threshold, "must be >= 0")
    if spec.rcm_kernel_size < 0:
        bad("rcm_kernel_size", spec.rcm_kernel_size, "must be >= 0")
    if spec.rcm_dilate_size < 0:
        bad("rcm_dilate_size", spec.rcm_dilate_size, "must be >= 0")
    for c in spec.control_images:
        if not Path(c).is_file():
            bad("control_images", c, "is not a file")


def read_prompt_file(path: str | Path, defaults: GenerationSpec) -> list[GenerationSpec]:
    """One prompt per non-empty line; lines starting with # are comments. Every line's values are checked."""
    from ..fileio import read_text

    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompt file not found: {p}")
    specs = []
    for i, line in enumerate(read_text(p, "prompt file").splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            specs.append(parse_prompt_line(line, defaults, where=f"{p}:{i}"))
            check_spec(specs[-1], f"{p}:{i}", LINE_NAMES)
    if not specs:
        raise UserError(f"{p}: no prompts (one prompt per line)")
    return specs
