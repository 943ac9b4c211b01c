"""What one generation is (`GenerationSpec`) and the prompt files shared by --from_file and --sample_prompts, with
musubi-tuner's syntax:

    a cat on a roof --w 1024 --h 768 --d 42 --s 25 --l 4.0 --fs 2.2 --n blurry, low quality --ci ref.png

--w/--h size, --d seed, --s steps, --l guidance (CFG) scale, --g the same in generation (in sample prompts of
training --g is other models' embedded guidance and is ignored, as musubi-tuner does), --fs flow shift, --n negative
prompt, --ci control image (repeatable), --f output layers (layered, sample prompts only), --m inpainting mask and
--rcm_th RCM threshold, --rcm_rel_th relative threshold (1/true/yes), --rcm_ks kernel size, --rcm_ds dilate size
(generation only). Each of musubi-tuner's two parsers is followed: generation switches are case-sensitive, sample
prompt switches are not; unknown ones (other models' --i, --cn, ...) are ignored with a warning.

Files: text (one prompt per line, # comments), or musubi-tuner's `.toml` (a [prompt] table of defaults with
[[prompt.subset]] entries) and `.json` (a list of prompt lines or tables) with its key names (prompt, width, height,
seed, sample_steps, cfg_scale, discrete_flow_shift, negative_prompt, control_image_path, frame_count, ...).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError

logger = logging.getLogger(__name__)


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
    mask_path: str | None = None
    rcm_threshold: float | None = None
    rcm_relative: bool = False
    rcm_kernel_size: int = 3
    rcm_dilate_size: int = 0
    caption_language: str | None = None  # set when the prompt is an automatic caption (layered without a prompt)

    def resolved_seed(self) -> int:
        if self.seed is None:
            self.seed = random.randint(0, 2**32 - 1)
        return self.seed


def _flag(value: str) -> bool:
    """musubi-tuner's reading of --rcm_rel_th: on for 1/true/yes, off for anything else (a bare switch too)."""
    return value.strip().lower() in ("1", "true", "yes")


# switch -> (spec field, converter)
_LINE_OPTIONS = {
    "w": ("width", int), "h": ("height", int), "d": ("seed", int), "s": ("steps", int),
    "g": ("guidance_scale", float), "l": ("guidance_scale", float), "fs": ("flow_shift", float),
    "n": ("negative_prompt", str), "ci": ("control_images", str), "f": ("output_layers", int),
    "m": ("mask_path", str), "rcm_th": ("rcm_threshold", float), "rcm_rel_th": ("rcm_relative", _flag),
    "rcm_ks": ("rcm_kernel_size", int), "rcm_ds": ("rcm_dilate_size", int),
}
# what each of musubi-tuner's two line parsers does not read (its generation script, its training samples)
_NOT_IN_GENERATION = {"f": "--f is not read from generation prompt lines (as in musubi-tuner); use --output_layers"}
_NOT_IN_SAMPLES = {
    "g": "--g (embedded guidance of other models) is ignored; --l sets the CFG scale",
    **{k: f"--{k} is not read from sample prompts (as in musubi-tuner): samples use no mask or RCM"
       for k in ("m", "rcm_th", "rcm_rel_th", "rcm_ks", "rcm_ds")},
}
MAX_SAMPLE_STEPS = 1000  # musubi-tuner clamps --s of sample prompts to this
# musubi-tuner's prompt-table keys (.toml / .json prompt files) -> spec fields
_TABLE_KEYS = {
    "prompt": ("prompt", str), "negative_prompt": ("negative_prompt", str), "width": ("width", int),
    "height": ("height", int), "seed": ("seed", int), "sample_steps": ("steps", int), "infer_steps": ("steps", int),
    "steps": ("steps", int), "cfg_scale": ("guidance_scale", float), "guidance_scale": ("guidance_scale", float),
    "discrete_flow_shift": ("flow_shift", float), "flow_shift": ("flow_shift", float),
    "control_image_path": ("control_images", str), "frame_count": ("output_layers", int),
    "output_layers": ("output_layers", int), "mask_path": ("mask_path", str),
    "rcm_threshold": ("rcm_threshold", float), "rcm_relative_threshold": ("rcm_relative", bool),
    "rcm_kernel_size": ("rcm_kernel_size", int), "rcm_dilate_size": ("rcm_dilate_size", int),
}
_IGNORED_TABLE_KEYS = {"enum", "subset"}


def _warn_once(seen: set, what: str, where: str) -> None:
    if what not in seen:
        seen.add(what)
        logger.warning("%s: %s", where, what)


def parse_prompt_line(line: str, defaults: GenerationSpec, where: str = "prompt line", training: bool = False,
                      warned: set | None = None, allow_empty: bool = False) -> GenerationSpec:
    """One prompt line, read as musubi-tuner reads it: in generation (--from_file, --interactive) switches are
    case-sensitive and a line that starts with a switch keeps the --prompt text; in sample prompts of training
    (`training`) switches are case-insensitive and a line that starts with `--` is prompt text. `--n` without text sets
    no negative prompt. `allow_empty`: a line of options only is a prompt too (layered: the image is captioned)."""
    warned = set() if warned is None else warned
    text = line.strip()
    if not training and text.startswith("--"):
        parts, prompt = (" " + text).split(" --"), defaults.prompt
    else:
        parts = text.split(" --")
        prompt = parts[0].strip()
    spec = dataclasses.replace(defaults, prompt=prompt, control_images=list(defaults.control_images))
    given_ci = False
    for part in parts[1:]:
        key, _, value = part.partition(" ")
        key, value = key.strip(), value.strip()
        if training:
            key = key.lower()
        if key not in _LINE_OPTIONS:
            _warn_once(warned, f"--{key} is not an option of Qwen-Image prompt lines and is ignored", where)
            continue
        skipped = (_NOT_IN_SAMPLES if training else _NOT_IN_GENERATION).get(key)
        if skipped:
            _warn_once(warned, skipped, where)
            continue
        if key == "n" and not value:  # musubi-tuner: a bare --n sets nothing
            continue
        attr, conv = _LINE_OPTIONS[key]
        try:
            v = conv(value)
        except ValueError:
            raise UserError(f"{where}: --{key} needs a {conv.__name__}, got {value!r}") from None
        if training and key == "s" and v > MAX_SAMPLE_STEPS:
            _warn_once(warned, f"--s {v} is clamped to {MAX_SAMPLE_STEPS} (as in musubi-tuner)", where)
            v = MAX_SAMPLE_STEPS
        if attr == "control_images":
            if not given_ci:
                spec.control_images, given_ci = [], True
            spec.control_images.append(v)
        else:
            setattr(spec, attr, v)
    if not spec.prompt and not allow_empty:
        raise UserError(f"{where}: empty prompt")
    return spec


def spec_from_table(table: dict, defaults: GenerationSpec, where: str, training: bool = False,
                    warned: set | None = None, allow_empty: bool = False) -> GenerationSpec:
    """A musubi-tuner prompt table ({"prompt": ..., "width": ..., ...}) as a spec."""
    warned = set() if warned is None else warned
    spec = dataclasses.replace(defaults, control_images=list(defaults.control_images))
    for key, value in table.items():
        key_l = key.lower()
        if key_l in _IGNORED_TABLE_KEYS:
            continue
        if key_l not in _TABLE_KEYS:
            _warn_once(warned, f"key {key!r} is not used by Qwen-Image and is ignored", where)
            continue
        if training and key_l == "guidance_scale":
            _warn_once(warned, "guidance_scale (embedded guidance of other models) is ignored; cfg_scale sets the "
                       "CFG scale", where)
            continue
        attr, conv = _TABLE_KEYS[key_l]
        if attr == "control_images":
            values = value if isinstance(value, list) else [value]
            if not all(isinstance(v, str) for v in values):
                raise UserError(f"{where}: control_image_path must be a path or a list of paths")
            spec.control_images = list(values)
            continue
        ok = isinstance(value, bool) if conv is bool else isinstance(value, str) if conv is str else \
            isinstance(value, (int, float)) and not isinstance(value, bool) and (conv is float or value == int(value))
        if not ok:
            raise UserError(f"{where}: {key} must be a {conv.__name__}, got {value!r}")
        setattr(spec, attr, conv(value))
    if not spec.prompt and not allow_empty:
        raise UserError(f"{where}: empty prompt")
    return spec


LINE_NAMES = {"height": "--h", "width": "--w", "steps": "--s", "guidance_scale": "--l", "flow_shift": "--fs",
              "seed": "--d", "output_layers": "--f", "rcm_threshold": "--rcm_th", "rcm_kernel_size": "--rcm_ks",
              "rcm_dilate_size": "--rcm_ds", "control_images": "--ci", "mask_path": "--m"}
TABLE_NAMES = {"height": "height", "width": "width", "steps": "sample_steps", "guidance_scale": "cfg_scale",
               "flow_shift": "discrete_flow_shift", "seed": "seed", "output_layers": "frame_count",
               "rcm_threshold": "rcm_threshold", "rcm_kernel_size": "rcm_kernel_size",
               "rcm_dilate_size": "rcm_dilate_size", "control_images": "control_image_path", "mask_path": "mask_path"}
CLI_NAMES = {"height": "--image_size", "width": "--image_size", "steps": "--infer_steps",
             "guidance_scale": "--guidance_scale", "flow_shift": "--flow_shift", "seed": "--seed",
             "output_layers": "--output_layers", "rcm_threshold": "--rcm_threshold",
             "rcm_kernel_size": "--rcm_kernel_size", "rcm_dilate_size": "--rcm_dilate_size",
             "control_images": "--control_image_path", "mask_path": "--mask_path"}
MAX_SEED = 2**64 - 1


def check_spec(spec: GenerationSpec, where: str = "", names: dict[str, str] = CLI_NAMES) -> None:
    """Value ranges of one generation, checked before any model loads; `names` are the option spellings of where
    the values came from (the command line, a prompt-file line or a prompt table)."""
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
    if spec.mask_path is not None and not Path(spec.mask_path).is_file():
        bad("mask_path", spec.mask_path, "is not a file")


def read_prompt_file(path: str | Path, defaults: GenerationSpec, training: bool = False, allow_empty: bool = False
                     ) -> list[GenerationSpec]:
    """Every prompt of a text, .toml or .json prompt file, each checked (values, files) before any model loads;
    `allow_empty`: lines of options only are prompts too (layered: the image is captioned)."""
    from ..fileio import read_text

    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompt file not found: {p}")
    text = read_text(p, "prompt file")
    warned: set = set()
    specs = []
    suffix = p.suffix.lower()
    if suffix in (".toml", ".json"):
        try:
            if suffix == ".toml":
                import tomllib

                data = tomllib.loads(text)
                base = data.get("prompt")
                if not isinstance(base, dict) or not isinstance(base.get("subset", []), list):
                    raise UserError(f"{p}: a .toml prompt file needs a [prompt] table with [[prompt.subset]] entries")
                entries = [{**base, **sub} for sub in base.get("subset", [])]
            else:
                entries = json.loads(text)
                if not isinstance(entries, list):
                    raise UserError(f"{p}: a .json prompt file is a list of prompt lines or tables")
        except ValueError as e:  # json.JSONDecodeError and tomllib.TOMLDecodeError
            raise UserError(f"{p}: invalid {suffix[1:].upper()} ({e})") from None
        for i, entry in enumerate(entries, 1):
            where = f"{p}: prompt {i}"
            if isinstance(entry, str):
                specs.append(parse_prompt_line(entry, defaults, where, training, warned, allow_empty))
                check_spec(specs[-1], where, LINE_NAMES)
            elif isinstance(entry, dict):
                specs.append(spec_from_table(entry, defaults, where, training, warned, allow_empty))
                check_spec(specs[-1], where, TABLE_NAMES)
            else:
                raise UserError(f"{where}: expected a prompt line or a table, got {type(entry).__name__}")
    else:
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                specs.append(parse_prompt_line(line, defaults, f"{p}:{i}", training, warned, allow_empty))
                check_spec(specs[-1], f"{p}:{i}", LINE_NAMES)
    if not specs:
        raise UserError(f"{p}: no prompts")
    return specs
