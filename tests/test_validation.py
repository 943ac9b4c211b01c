"""Validation loss: held-out items, fixed noise and sigmas, no effect on training, every model version, resume."""

import csv
import math
from pathlib import Path

import pytest
import torch
from conftest import add_validation_dataset, make_cached_dataset, train_args

from musubi_tuner.qwen_image_train_network import main as train_main

LORA = ["--network_module", "networks.lora_qwen_image", "--network_dim", "4", "--learning_rate", "1e-2"]


def read_log(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_held_out_split_is_seeded_and_never_trained(tmp_path, monkeypatch):
    """validation_split holds out a seeded fraction by name; those items never reach a training batch; the
    validation loss falls as the LoRA learns, and the log holds one row per pass."""
    from musubi_tuner.dataset.config import load_dataset_config
    from musubi_tuner.dataset.holdout import split_items
    from musubi_tuner.dataset.items import collect_items
    from musubi_tuner.models.registry import VERSIONS

    models, toml = make_cached_dataset(tmp_path, "original", n=8, batch_size=2, colours=["red"])
    toml.write_text(toml.read_text().replace("batch_size = 2", "batch_size = 2\nvalidation_split = 0.25"))
    items = collect_items(load_dataset_config(toml), VERSIONS["original"])
    train, held = split_items(items, 0.0, 42)
    assert len(held) == 2 and len(train) == 6
    again = split_items(list(reversed(items)), 0.0, 42)[1]
    assert sorted(i.key for i in again) == sorted(i.key for i in held)  # listing order does not matter
    assert sorted(i.key for i in split_items(items, 0.0, 7)[1]) != sorted(i.key for i in held)

    trace = tmp_path / "trace"
    monkeypatch.setenv("MUSUBI_TUNER_TRACE_DIR", str(trace))
    out = tmp_path / "out"
    r = train_main(train_args(models, toml, out, "original", *LORA, "--max_train_steps", "30",
                              "--validate_at_start", "--validate_every_n_steps", "10",
                              "--validation_sigmas", "0.2", "0.8"))
    import json

    trained = {name for batch in json.loads((trace / "rank0.json").read_text())["items"] for name in batch}
    held_names = {f"{i.key}" for i in held}
    assert trained and not any(name.startswith(h + "_") for name in trained for h in held_names)
    rows = read_log(r["validation_log"])
    assert [int(row["step"]) for row in rows] == [0, 10, 20, 30]
    assert list(rows[0]) == ["step", "epoch", "mean", "relative", "sigma_0.2", "sigma_0.8"]
    assert float(rows[0]["relative"]) == 1.0
    means = [float(row["mean"]) for row in rows]
    assert means == sorted(means, reverse=True) and means[-1] < 0.8 * means[0], means
    for row in rows:  # mean of the per-sigma values
        assert math.isclose(float(row["mean"]), (float(row["sigma_0.2"]) + float(row["sigma_0.8"])) / 2, rel_tol=1e-4)


def test_passes_are_repeatable_and_leave_training_unchanged(tmp_path):
    """Two passes on the same weights give identical numbers; a run with validation passes trains exactly as the
    same run without them (same losses, same weights)."""
    from accelerate import Accelerator

    from musubi_tuner.dataset.loader import check_caches
    from musubi_tuner.qwen_image.dit import load_dit
    from musubi_tuner.models.registry import VERSIONS

    models, toml = make_cached_dataset(tmp_path, "original", n=4, batch_size=2)
    base = train_args(models, toml, tmp_path / "plain", "original", *LORA, "--max_train_steps", "6")
    plain = train_main(base)
    add_validation_dataset(tmp_path, toml, models, "original")
    checked = train_main(train_args(models, toml, tmp_path / "val_run", "original", *LORA, "--max_train_steps", "6",
                                    "--validate_at_start", "--validate_every_n_steps", "2"))
    assert checked["losses"] == plain["losses"]
    from safetensors.torch import load_file

    wa, wb = load_file(str(plain["final"])), load_file(str(checked["final"]))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert [h["step"] for h in checked["validation"]] == [0, 2, 4, 6]

    from musubi_tuner.dataset.config import load_dataset_config
    from musubi_tuner.dataset.items import collect_items
    import argparse

    from musubi_tuner.training.trainer import make_validator

    version = VERSIONS["original"]
    items = [it for it in collect_items(load_dataset_config(toml), version) if it.config.validation]
    args = argparse.Namespace(validation_sigmas=[0.3, 0.9], max_validation_steps=None, seed=1, validation_seed=None,
                              output_dir=str(tmp_path / "direct"), output_name="x", resume=None,
                              timestep_sampling="shift", remove_first_image_from_target=False,
                              weighting_scheme="none")
    validator = make_validator(args, check_caches(items, version), is_main=False, version=version)
    model = load_dit(models["dit"], version, torch.float32, "cpu")
    acc = Accelerator(cpu=True)
    first = validator.run(model, version, args, acc, torch.device("cpu"), torch.float32, 0, 0)
    second = validator.run(model, version, args, acc, torch.device("cpu"), torch.float32, 0, 0)
    assert first["sigmas"] == second["sigmas"] and second["relative"] == 1.0
    assert first["sigmas"][0.3] != first["sigmas"][0.9]


@pytest.mark.parametrize("version_name", ["edit-2511", "layered"])
def test_edit_and_layered_validation(tmp_path, version_name):
    models, toml = make_cached_dataset(tmp_path, version_name, n=2, batch_size=1)
    add_validation_dataset(tmp_path, toml, models, version_name, n=2)
    r = train_main(train_args(models, toml, tmp_path / "out", version_name, *LORA, "--max_train_steps", "2",
                              "--validate_at_start"))
    passes = r["validation"]
    assert [p["step"] for p in passes] == [0, 2]  # at start, and the trained model's figure at the end
    assert all(math.isfinite(v) and v > 0 for p in passes for v in p["sigmas"].values())
    assert len(passes[0]["sigmas"]) == 5  # default: five quantiles of the training distribution


def test_resumed_run_continues_the_same_validation_curve(tmp_path):
    models, toml = make_cached_dataset(tmp_path, "original", n=4, batch_size=2)
    add_validation_dataset(tmp_path, toml, models, "original")
    opts = [*LORA, "--validate_every_n_steps", "1", "--save_state"]
    full = train_main(train_args(models, toml, tmp_path / "full", "original", *opts, "--max_train_steps", "4"))
    part = tmp_path / "part"
    train_main(train_args(models, toml, part, "original", *opts, "--max_train_steps", "2"))
    resumed = train_main(train_args(models, toml, part, "original", *opts, "--max_train_steps", "4",
                                    "--resume", str(part / "lora-state")))
    assert read_log(resumed["validation_log"]) == read_log(full["validation_log"])


def test_validation_option_errors(tmp_path, capsys):
    models, toml = make_cached_dataset(tmp_path, "original", n=2, batch_size=1)
    for extra, msg in ((["--validation_split", "1.5"], "--validation_split 1.5 must be in [0, 1)"),
                       (["--validation_sigmas", "0"], "outside (0, 1]"),
                       (["--validate_every_n_steps", "0"], "--validate_every_n_steps 0 must be at least 1")):
        with pytest.raises(SystemExit):
            train_main(train_args(models, toml, tmp_path / "o", "original", *LORA, "--max_train_steps", "1", *extra))
        assert msg in capsys.readouterr().err
    toml.write_text(toml.read_text().replace("[[datasets]]", "[[datasets]]\nvalidation = true"))
    with pytest.raises(SystemExit):
        train_main(train_args(models, toml, tmp_path / "o", "original", *LORA, "--max_train_steps", "1"))
    assert "leave at least one dataset for training" in capsys.readouterr().err


def test_validation_with_block_swap_and_checkpointing_matches(tmp_path):
    models, toml = make_cached_dataset(tmp_path, "original", n=2, batch_size=1)
    add_validation_dataset(tmp_path, toml, models, "original")
    runs = [train_main(train_args(models, toml, tmp_path / name, "original", *LORA, "--max_train_steps", "2",
                                  "--validate_at_start", *extra))["validation"]
            for name, extra in (("plain", []), ("swap", ["--blocks_to_swap", "1", "--gradient_checkpointing"]))]
    for a, b in zip(*runs):
        assert a["step"] == b["step"] and all(math.isclose(a["sigmas"][s], b["sigmas"][s], rel_tol=1e-4)
                                              for s in a["sigmas"])


def test_validate_every_n_epochs(tmp_path):
    """Passes at the end of every n-th epoch, plus the trained model's figure at the end; without any schedule option,
    one pass per epoch."""
    models, toml = make_cached_dataset(tmp_path, "original", n=4, batch_size=2)  # 2 steps per epoch
    add_validation_dataset(tmp_path, toml, models, "original")
    every_two = train_main(train_args(models, toml, tmp_path / "a", "original", *LORA, "--max_train_epochs", "3",
                                      "--validate_every_n_epochs", "2"))
    assert [(h["step"], h["epoch"]) for h in every_two["validation"]] == [(4, 2), (6, 3)]
    default = train_main(train_args(models, toml, tmp_path / "b", "original", *LORA, "--max_train_epochs", "3"))
    assert [h["step"] for h in default["validation"]] == [2, 4, 6]


def test_loss_plot_is_drawn_at_each_save_and_names_where_to_watch(tmp_path, caplog):
    """<output_name>_loss.png beside the CSVs: training loss in blue, validation in orange, redrawn at each save; the
    log says where the TensorBoard events are and how to watch them."""
    import logging

    import numpy as np
    from PIL import Image

    models, toml = make_cached_dataset(tmp_path, "original", n=2, batch_size=1)
    add_validation_dataset(tmp_path, toml, models, "original")
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        r = train_main(train_args(models, toml, out, "original", "--max_train_steps", "4", "--save_every_n_steps",
                                  "2", "--validate_every_n_steps", "2"))
    plot = out / "lora_loss.png"
    arr = np.asarray(Image.open(plot).convert("RGB")).astype(int)
    assert arr.shape == (420, 800, 3)
    blue = ((arr[:, :, 2] > 150) & (arr[:, :, 0] < 60)).sum()
    orange = ((arr[:, :, 0] > 200) & (arr[:, :, 1] > 90) & (arr[:, :, 1] < 150) & (arr[:, :, 2] < 60)).sum()
    assert blue > 20 and orange > 20, (blue, orange)
    assert f"tensorboard --logdir {r['logging_dir']}" in caplog.text
    # the plot is one of the run's results: a new run refuses to replace it without --overwrite, and removes it with
    from musubi_tuner.training.outputs import existing_outputs

    assert plot in existing_outputs(out, "lora")
