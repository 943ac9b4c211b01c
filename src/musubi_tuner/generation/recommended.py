"""Recommended settings a DiT file carries in its safetensors metadata, used as defaults where the user gives none.

The 20B models work at the tools' defaults (CFG 4.0, 1024x1024, 25 steps, Edit-2511 controls at about 1M pixels);
a small model such as the shipped nano family does not (CFG 4.0 turns a nano edit into a black blob, a 64-pixel input
becomes a 640x640 layered generation). Such a file says what fits it under one metadata key:

    recommended_settings = {"guidance_scale": 1.0, "infer_steps": 20, "image_size": [64, 64],
                            "control_sizing": "native"}

image_size is [height, width] like --image_size; control_sizing "native" means controls are used at their own size
(no advice to resize Edit-2511 controls to the official 1M pixels). Options on the command line (or a prompt line's
switches) always win.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

METADATA_KEY = "recommended_settings"
CONTROL_SIZING = ("native", "official", "image")


def check(settings: dict) -> dict:
    """The recognised, well-formed fields of a recommendation (anything else is dropped with a warning)."""
    out = {}
    for key, value in settings.items():
        ok = {
            "guidance_scale": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 100,
            "infer_steps": lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 1000,
            "image_size": lambda v: isinstance(v, list) and len(v) == 2 and all(
                isinstance(x, int) and x > 0 and x % 16 == 0 for x in v),
            "control_sizing": lambda v: v in CONTROL_SIZING,
        }.get(key)
        if ok is None or not ok(value):
            logger.warning("ignoring the recommended setting %s = %r of the DiT file", key, value)
            continue
        out[key] = value
    return out


def read(dit: str | Path | None) -> dict:
    """The DiT file's recommended settings ({} when it has none or is not readable: the normal checks report that)."""
    if not dit:
        return {}
    from ..qwen_image.model_files import inspect_file

    try:
        text = inspect_file(dit, "--dit").metadata.get(METADATA_KEY)
    except Exception:  # noqa: BLE001 - the file checks that follow give the error
        return {}
    if not text:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        logger.warning("%s: its %s metadata is not JSON; ignored", dit, METADATA_KEY)
        return {}
    return check(data) if isinstance(data, dict) else {}


def apply_to_generation(args, settings: dict) -> list[str]:
    """Fill the generation options the user left unset from `settings`; returns what was taken, for one log line."""
    taken = []
    if "guidance_scale" in settings and args.guidance_scale is None:
        args.guidance_scale = float(settings["guidance_scale"])
        taken.append(f"--guidance_scale {args.guidance_scale:g}")
    if "infer_steps" in settings and args.infer_steps is None:
        args.infer_steps = settings["infer_steps"]
        taken.append(f"--infer_steps {args.infer_steps}")
    if "image_size" in settings and args.image_size is None:
        args.image_size = list(settings["image_size"])
        taken.append(f"--image_size {args.image_size[0]} {args.image_size[1]}")
    sizing = settings.get("control_sizing")
    if sizing and not (args.resize_control_to_official_size or args.resize_control_to_image_size):
        args.resize_control_to_official_size = sizing == "official"
        args.resize_control_to_image_size = sizing == "image"
        args.control_sizing_recommended = True
        taken.append(f"controls at {sizing} size")
    if taken:
        logger.info("using the settings %s recommends (give the options to override): %s", Path(args.dit).name,
                    ", ".join(taken))
    return taken


def sample_defaults(args) -> dict:
    """Defaults for sample prompts during training: the CFG scale and steps the DiT file recommends."""
    settings = read(getattr(args, "dit", None))
    out = {}
    if "guidance_scale" in settings:
        out["guidance_scale"] = float(settings["guidance_scale"])
    if "infer_steps" in settings:
        out["steps"] = settings["infer_steps"]
    return out
