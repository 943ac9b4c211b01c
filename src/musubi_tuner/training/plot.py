"""A picture of the run beside its CSV logs: `<output_name>_loss.png`, redrawn at each save.

The training loss per step (light), its moving average (dark) and, when validation runs, the validation loss per pass
(orange points joined by a line), on one axis of steps; drawn with Pillow (no plotting library).
"""

from __future__ import annotations

import logging
from pathlib import Path

from .outputs import LossLog, loss_log_path, loss_plot_path, validation_log_path

logger = logging.getLogger(__name__)

WIDTH, HEIGHT = 800, 420
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 40, 50


def _read(path: Path | None, column: str) -> list[tuple[int, float]]:
    """(step, value) of a loss or validation log; rows without a number there are skipped."""
    out = []
    for row in LossLog(path, []).rows() if path is not None else []:
        try:
            out.append((int(row["step"]), float(row[column])))
        except (KeyError, TypeError, ValueError):
            continue
    return out


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def write_loss_plot(loss_log: Path, validation_log: Path | None, out: Path, title: str) -> Path | None:
    """Draw the plot; None when there is nothing to draw yet."""
    from PIL import Image, ImageDraw, ImageFont

    from ..fileio import save_image

    loss = _read(loss_log, "loss")
    val = _read(validation_log, "mean")
    if not loss and not val:
        return None
    steps = [s for s, _ in loss + val]
    values = [v for _, v in loss + val]
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    lo, hi = min(values), max(values)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * abs(lo or 1), hi + 0.5 * abs(hi or 1)
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad

    def xy(step: float, value: float) -> tuple[float, float]:
        x = LEFT + (step - x0) / (x1 - x0) * (WIDTH - LEFT - RIGHT)
        y = TOP + (hi - value) / (hi - lo) * (HEIGHT - TOP - BOTTOM)
        return x, y

    img = Image.new("RGB", (WIDTH, HEIGHT), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=12)
    d.rectangle((LEFT, TOP, WIDTH - RIGHT, HEIGHT - BOTTOM), outline=(160, 160, 160))
    for k in range(5):  # value grid and labels
        v = lo + (hi - lo) * k / 4
        _, y = xy(x0, v)
        d.line((LEFT, y, WIDTH - RIGHT, y), fill=(235, 235, 235))
        d.text((4, y - 7), f"{v:.4g}", fill=(80, 80, 80), font=font)
    for k in range(5):  # step labels
        s = x0 + (x1 - x0) * k / 4
        x, _ = xy(s, lo)
        d.text((x - 12, HEIGHT - BOTTOM + 6), f"{int(round(s))}", fill=(80, 80, 80), font=font)
    d.text((WIDTH // 2 - 15, HEIGHT - 22), "step", fill=(80, 80, 80), font=font)
    if loss:
        pts = [xy(s, v) for s, v in loss]
        if len(pts) > 1:
            d.line(pts, fill=(170, 195, 235), width=1)
        avg = moving_average([v for _, v in loss], max(1, len(loss) // 25))
        pts = [xy(s, v) for (s, _), v in zip(loss, avg)]
        if len(pts) > 1:
            d.line(pts, fill=(30, 70, 170), width=2)
    if val:
        pts = [xy(s, v) for s, v in val]
        if len(pts) > 1:
            d.line(pts, fill=(230, 120, 20), width=2)
        for x, y in pts:
            d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=(230, 120, 20))
    legend = "blue: training loss (light: per step, dark: moving average)" + ("; orange: validation loss" if val else "")
    d.text((LEFT, 8), title, fill=(0, 0, 0), font=font)
    d.text((LEFT, 22), legend, fill=(60, 60, 60), font=font)
    return save_image(img, out)


def update_loss_plot(output_dir: Path, output_name: str, validation: bool) -> Path | None:
    """Redraw the run's plot from its logs; a failure to draw is a warning, never a failed save."""
    out = loss_plot_path(output_dir, output_name)
    try:
        return write_loss_plot(loss_log_path(output_dir, output_name),
                               validation_log_path(output_dir, output_name) if validation else None, out,
                               f"{output_name}: loss")
    except Exception as e:  # noqa: BLE001 - the checkpoint matters, the picture does not
        logger.warning("could not draw %s: %s", out, e)
        return None
