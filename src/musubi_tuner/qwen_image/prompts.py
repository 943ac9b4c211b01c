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


def read_prompt_file(path: str | Path, defaults: GenerationSpec) -> list[GenerationSpec]:
    """One prompt per non-empty line; lines starting with # are comments."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompt file not found: {p}")
    specs = []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip() and not line.lstrip().startswith("#"):
            specs.append(parse_prompt_line(line, defaults, where=f"{p}:{i}"))
    if not specs:
        raise UserError(f"{p}: no prompts (one prompt per line)")
    return specs
