"""LoRA extraction, proven on the nano models: full-finetune the nano text-to-image DiT on the demo's purple data with
qwen_image_train.py, extract LoRAs of several ranks from it with qwen_extract_lora.py, and let the judge score the
base, the finetune and each extracted LoRA on purple (the new concept) and on the colours the model knew.

    python bench/extract_nano.py [--output outputs/extract_nano] [--steps 300] [--ranks 4 16 64] [--samples 40]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="outputs/extract_nano")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--learning_rate", type=float, default=2e-4)
    p.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--samples", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()

    from musubi_tuner.nano import evaluate as ev
    from musubi_tuner.nano.build import set_batch_size
    from musubi_tuner.nano.models import shipped
    from musubi_tuner.nano.stories import STORIES
    from musubi_tuner.qwen_extract_lora import main as extract
    from musubi_tuner.qwen_image_cache_latents import main as cache_latents
    from musubi_tuner.qwen_image_cache_text_encoder_outputs import main as cache_text
    from musubi_tuner.qwen_image_train import main as finetune

    story, paths = STORIES["original"], shipped("original")
    out = Path(a.output).resolve()
    toml = story.write_dataset(out / "data", story.items, a.seed)
    set_batch_size(toml, 8)
    common = ["--dataset_config", str(toml), "--device", "cpu"]
    cache_latents(common + ["--vae", str(paths["vae"]), "--skip_existing"])
    cache_text(common + ["--text_encoder", str(paths["text_encoder"]), "--skip_existing"])
    t0 = time.perf_counter()
    tuned = finetune(common + ["--dit", str(paths["dit"]), "--output_dir", str(out / "finetune"), "--output_name",
                               "purple_full", "--optimizer_type", "adamw", "--learning_rate", str(a.learning_rate),
                               "--lr_scheduler", "constant", "--timestep_sampling", "shift", "--discrete_flow_shift",
                               "2.2", "--max_train_steps", str(a.steps), "--seed", str(a.seed),
                               "--max_data_loader_n_workers", "0", "--mixed_precision", "no", "--overwrite"])["final"]
    print(f"full finetune: {time.perf_counter() - t0:.0f}s -> {tuned}")

    def score(dit, loras=()):
        gen = ev.NanoGenerator({**paths, "dit": dit}, "original", loras)
        return {"purple": story.score_concept(gen, a.samples, a.seed + 1000).main,
                "old": story.score_old(gen, a.samples, a.seed + 2000).main}

    rows = {"base": score(paths["dit"]), "full finetune": score(tuned)}
    for r in a.ranks:
        lora = out / f"extracted_rank{r}.safetensors"
        info = extract(["--model_org", str(paths["dit"]), "--model_tuned", str(tuned), "--save_to", str(lora),
                        "--dim", str(r)])
        rows[f"extracted rank {r}"] = {**score(paths["dit"], [(lora, 1.0)]), "error": info["error"]}
    print(f"\n{'model':<22}{'purple':>8}{'old':>8}{'reconstruction error':>22}")
    for name, s in rows.items():
        err = f"{s['error']:>22.3f}" if "error" in s else f"{'':>22}"
        print(f"{name:<22}{s['purple']:>8.0%}{s['old']:>8.0%}{err}")
    gain = rows["full finetune"]["purple"] - rows["base"]["purple"]
    for r in a.ranks:
        kept = (rows[f"extracted rank {r}"]["purple"] - rows["base"]["purple"]) / gain if gain else float("nan")
        print(f"rank {r} keeps {kept:.0%} of the finetune's gain on purple")
    (out / "scores.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
