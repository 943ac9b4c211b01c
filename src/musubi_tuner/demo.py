"""The demo on the shipped nano models: teach one of them something new with a LoRA, and let a judge see it.

The nano Qwen-Image models (real architectures, trained on a world of coloured shapes; see `musubi_tuner.nano`) ship
with the package. The demo, with the real entry points and no download:

1. writes a small dataset of a concept the model has never seen (original: the colour word "purple", beside as many
   scenes it knows; edit-2511: the edit "make it large"; layered: diamonds to decompose into layers);
2. caches latents and text-encoder outputs;
3. scores the model on the new concept and on old ones with a deterministic judge (it reads shape, colour, size and
   position from the pixels);
4. trains a LoRA;
5. scores again with the LoRA (the new concept learned, the old ones kept or forgotten) and writes a grid of the same
   prompts and seeds, without and with the LoRA.

    python -m musubi_tuner.demo [--version original|edit-2511|layered] [--output outputs/demo] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import UserError, cli_main


def command_line(module: str, argv: list[str]) -> str:
    """The command a user can paste to run the same step: the script path when run from the repository, else the
    module."""
    import shlex

    script = Path("src/musubi_tuner") / (module.rsplit(".", 1)[-1] + ".py")
    head = ["python", str(script)] if script.is_file() else ["python", "-m", module]
    return shlex.join(head + argv)


def _run(title: str, fn, argv: list[str]):
    print(f"\n== {title}\n   {command_line(fn.__module__, argv)}", flush=True)
    return fn(argv)


def _parser() -> argparse.ArgumentParser:
    from .nano.stories import STORIES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", choices=list(STORIES), default="original", help="which nano model learns what")
    p.add_argument("--output", default="outputs/demo", help="folder for data, caches, LoRA, scores and the grid")
    p.add_argument("--steps", type=int, default=None, help="LoRA training steps (default: the story's, about a minute)")
    p.add_argument("--samples", type=int, default=40, help="judged generations per score")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--models", default=None,
                   help="folder of nano model files (default: the shipped ones; `python -m musubi_tuner.nano build` "
                        "makes them)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (training; judging runs on the CPU)")
    return p


@cli_main
def main(argv=None):
    args = _parser().parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # readable in a log file too: each line as it happens, in order
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    from .nano.models import WEIGHTS, shipped
    from .nano.stories import STORIES

    story = STORIES[args.version]
    steps = args.steps or story.steps
    if steps < 1 or args.samples < 1:
        raise UserError("--steps and --samples must be at least 1")
    paths = shipped(args.version, Path(args.models) if args.models else WEIGHTS)
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise UserError(f"nano model file missing: {missing[0]}; build them with `python -m musubi_tuner.nano build "
                        f"--output {paths['tokenizer'].parent}` or pass --models FOLDER")
    t0 = time.perf_counter()
    out = Path(args.output).resolve() / args.version  # absolute: the dataset config and printed commands work anywhere
    print(f"Teaching the nano {args.version} model {story.concept} ({story.items} training images of it"
          f"{story.data_note}, {steps} LoRA steps).")
    result = learn(story, paths, out, steps, args.samples, args.seed, args.device)
    b, a = result["before"], result["after"]
    print(f"\nDone in {time.perf_counter() - t0:.0f}s.")
    print(f"new concept ({story.score_label}): {b['new']['main']:.0%} -> {a['new']['main']:.0%} "
          f"of {b['new']['n']} judged generations")
    print(f"old concepts (how much was forgotten): {b['old']['main']:.0%} -> {a['old']['main']:.0%}")
    print(f"grid (rows: prompts; columns: seeds, without | with the LoRA): {result['grid']}")
    print(f"LoRA: {result['final']}\nscores: {out / 'scores.json'}\nloss log: {result['loss_log']}")
    print("generate with it:\n   " + command_line("musubi_tuner.qwen_image_generate_image", result["generate"]))
    return result


def learn(story, paths: dict, out: Path, steps: int, samples: int, seed: int = 0, device: str = "cpu") -> dict:
    """Dataset, caches, scores before, LoRA training, scores after, grid: the demo of one story."""
    from .fileio import save_image
    from .nano import evaluate as ev
    from .nano.build import set_batch_size
    from .qwen_image_cache_latents import main as cache_latents
    from .qwen_image_cache_text_encoder_outputs import main as cache_text
    from .qwen_image_train_network import main as train

    toml = story.write_dataset(out / "data", story.items, seed)
    set_batch_size(toml, 8)
    models = ["--text_encoder", str(paths["text_encoder"]), "--tokenizer", str(paths["tokenizer"])]
    common = ["--dataset_config", str(toml), "--model_version", story.version, "--device", device]
    _run("cache latents", cache_latents, common + ["--vae", str(paths["vae"]), "--skip_existing"])
    _run("cache text-encoder outputs", cache_text, common + models + ["--skip_existing"])

    rows = story.grid_rows(seed + 500)
    print("\n== judge the model without the LoRA", flush=True)
    base = ev.NanoGenerator(paths, story.version)
    with _counting(base, story, samples, rows, "judging without the LoRA"):
        before = {"new": story.score_concept(base, samples, seed + 1000).as_dict(),
                  "old": story.score_old(base, samples, seed + 2000).as_dict()}
        grid_before = _grid_cells(base, rows, seed)
    del base

    prompts = out / "sample_prompts.txt"
    first = rows[0]
    prompts.write_text(f"{first.prompt} --w 64 --h 64 --s 20 --d {seed}\n" if not first.controls else "")
    result = _run("train the LoRA", train, [
        "--dit", str(paths["dit"]), "--vae", str(paths["vae"]), *models, *common,
        "--output_dir", str(out / "lora"), "--output_name", f"nano_{story.version}_lora",
        "--network_module", "networks.lora_qwen_image", "--network_dim", "16", "--network_alpha", "16",
        "--optimizer_type", "adamw", "--learning_rate", str(story.learning_rate), "--lr_scheduler", "constant",
        "--timestep_sampling", "shift", "--discrete_flow_shift", "2.2", "--mixed_precision", "no",
        "--max_train_steps", str(steps), "--seed", str(seed), "--max_data_loader_n_workers", "0", "--overwrite",
        *(["--sample_prompts", str(prompts), "--sample_every_n_steps", str(max(1, steps // 2))]
          if not first.controls else [])])

    print("\n== judge the model with the LoRA", flush=True)
    tuned = ev.NanoGenerator(paths, story.version, [(result["final"], 1.0)])
    with _counting(tuned, story, samples, rows, "judging with the LoRA"):
        after = {"new": story.score_concept(tuned, samples, seed + 1000).as_dict(),
                 "old": story.score_old(tuned, samples, seed + 2000).as_dict()}
        grid_after = _grid_cells(tuned, rows, seed)
    grid = save_image(_grid(rows, grid_before, grid_after), out / "grid.png")
    from .fileio import atomic_path

    with atomic_path(out / "scores.json") as tmp:
        Path(tmp).write_text(json.dumps({"version": story.version, "concept": story.concept, "steps": steps,
                                         "before": before, "after": after}, indent=2))
    # the settings the judge scored with (also the nano files' recommended ones): CFG 1, 20 steps, 64x64
    generate = ["--dit", str(paths["dit"]), "--vae", str(paths["vae"]), *models, "--model_version", story.version,
                "--lora_weight", str(result["final"]), "--prompt", first.prompt, "--image_size", "64", "64",
                "--infer_steps", "20", "--guidance_scale", "1", "--seed", str(seed), "--save_path",
                str(out / "images")]
    if first.controls:  # edit: the images to edit; layered: the image to decompose
        inputs = [save_image(c, out / "inputs" / f"control_{k}.png") for k, c in enumerate(first.controls)]
        generate += ["--control_image_path", *map(str, inputs)]
    if first.layers:
        generate += ["--output_layers", str(first.layers)]
    return {**result, "before": before, "after": after, "grid": grid, "generate": generate}


def _counting(gen, story, samples: int, rows, title: str):
    """A progress bar over the judged generations (scores of the new and old concepts, then the grid)."""
    from tqdm.auto import tqdm

    from .nano.stories import judged_generations

    total = judged_generations(story, samples) + sum(1 if r.layers else GRID_SEEDS for r in rows)
    bar = tqdm(total=total, desc=title, unit="image")
    gen.progress = bar
    return bar


GRID_SEEDS = 4
CELL = 64


def _grid_cells(gen, rows, seed: int) -> list[list]:
    """Per row: the frames of each seed (layered: the layers, each shown on a checkerboard)."""
    cells = []
    for row in rows:
        per_seed = []
        for s in range(1 if row.layers else GRID_SEEDS):
            frames = gen.generate(row.prompt, seed + s, controls=list(row.controls), layers=row.layers)
            per_seed += [_on_checkerboard(f) for f in frames[1:]] if row.layers else frames[:1]
        cells.append(per_seed)
    return cells


def _on_checkerboard(image):
    from PIL import Image

    board = Image.new("RGBA", image.size, (200, 200, 200, 255))
    dark = Image.new("RGBA", (8, 8), (150, 150, 150, 255))
    for y in range(0, image.height, 8):
        for x in range((y // 8) % 2 * 8, image.width, 16):
            board.paste(dark, (x, y))
    return Image.alpha_composite(board, image.convert("RGBA")).convert("RGB")


def _grid(rows, before: list[list], after: list[list]):
    """Label column (prompt), the control images, then without | with the LoRA."""
    from PIL import Image, ImageDraw, ImageFont

    pad, label_w = 8, 300
    n_ctrl = max(len(r.controls) for r in rows)
    n_out = max(len(c) for c in before)
    width = label_w + (n_ctrl * (CELL + 2) + pad if n_ctrl else 0) + 2 * n_out * (CELL + 2) + pad
    height = 24 + len(rows) * (CELL + 4)
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=11)
    x_out = label_w + (n_ctrl * (CELL + 2) + pad if n_ctrl else 0)
    if n_ctrl:
        draw.text((label_w, 6), "input", fill=(0, 0, 0), font=font)
    draw.text((x_out, 6), "without the LoRA", fill=(0, 0, 0), font=font)
    draw.text((x_out + n_out * (CELL + 2) + pad, 6), "with the LoRA", fill=(0, 0, 0), font=font)
    for i, row in enumerate(rows):
        y = 24 + i * (CELL + 4)
        words, lines = row.prompt.split(), [""]
        for w in words:
            if draw.textlength(lines[-1] + " " + w, font=font) > label_w - 40:
                lines.append("")
            lines[-1] = (lines[-1] + " " + w).strip()
        draw.text((4, y + 4), f"[{row.label}]", fill=(120, 120, 120), font=font)
        for k, line in enumerate(lines[:4]):
            draw.text((40, y + 4 + 13 * k), line, fill=(0, 0, 0), font=font)
        for k, c in enumerate(row.controls):
            img.paste(c.convert("RGB").resize((CELL, CELL)), (label_w + k * (CELL + 2), y))
        for k, cell in enumerate(before[i]):
            img.paste(cell.convert("RGB"), (x_out + k * (CELL + 2), y))
        for k, cell in enumerate(after[i]):
            img.paste(cell.convert("RGB"), (x_out + n_out * (CELL + 2) + pad + k * (CELL + 2), y))
    return img.resize((width * 2, height * 2), Image.NEAREST)


if __name__ == "__main__":
    main()
