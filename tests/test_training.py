"""LoRA training: one step per model version, learning, save/resume, diffusers interop, timesteps, LR schedules."""

import math

import numpy as np
import pytest
import torch
from conftest import make_cached_dataset, train_args
from safetensors import safe_open
from safetensors.torch import load_file

from musubi_tuner.dataset.cache import read_latent_cache
from musubi_tuner.qwen_image import denoise
from musubi_tuner.qwen_image.dit import load_dit
from musubi_tuner.models.registry import VERSIONS
from musubi_tuner.qwen_image_generate_image import main as generate_main
from musubi_tuner.qwen_image_train_network import main as train_main
from musubi_tuner.training import trainer as trainer_mod


@pytest.mark.parametrize("version", ["original", "edit", "edit-2509", "edit-2511", "layered", "layered-remove-first"])
def test_one_step_per_version(tmp_path, version, monkeypatch):
    name = version.replace("-remove-first", "")
    models, toml = make_cached_dataset(tmp_path, name)
    seen = []
    real = denoise.predict_velocity

    def spy(model, noisy, sigma, text, mask, img_shapes, reference=None, additional_t_cond=None):
        out = real(model, noisy, sigma, text, mask, img_shapes, reference, additional_t_cond)
        seen.append((noisy.shape, None if reference is None else reference.shape, out.shape, img_shapes,
                     additional_t_cond))
        return out

    monkeypatch.setattr("musubi_tuner.qwen_image.loss.predict_velocity", spy)
    extra = ["--remove_first_image_from_target"] if version.endswith("remove-first") else []
    result = train_main(train_args(models, toml, tmp_path / "out", name, "--max_train_steps", "1",
                                   "--learning_rate", "1e-2", "--network_dim", "4", *extra))
    assert result["steps"] == 1 and all(math.isfinite(x) for x in result["losses"])
    noisy, ref, out, shapes, extra_t = seen[0]
    assert out == noisy  # the loss covers the target tokens only (shapes)
    v = VERSIONS[name]
    if v.controls == "required":
        n_ctrl = {"edit": 1}.get(name, 2)
        assert ref is not None and len(shapes) == 1 + n_ctrl and noisy[1] == 16
    if v.layer_targets:
        frames = 2 if extra else 3  # composite + 2 layers, or layers only
        assert len(shapes) == frames + 1 and noisy[1] == 16 * frames and extra_t is not None
    # only LoRA parameters changed: the base DiT file is untouched and the LoRA is non-zero
    lora = load_file(str(result["final"]))
    ups = [v for k, v in lora.items() if k.endswith("lora_up.weight")]
    assert ups and any(u.abs().sum() > 0 for u in ups)
    assert all(k.startswith("lora_unet_transformer_blocks_") for k in lora)


def test_base_weights_frozen_in_memory(tmp_path):
    """Inside the trainer, a step changes LoRA tensors and nothing of the DiT."""
    from musubi_tuner.networks.lora_qwen_image import create_network
    from musubi_tuner.qwen_image.tiny import tiny_dit

    dit = tiny_dit()
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    net = create_network(1.0, 4, 4, None, None, dit)
    net.apply_to(None, dit)
    dit.requires_grad_(False)
    groups, _ = net.prepare_optimizer_params(unet_lr=1e-2)
    opt = torch.optim.AdamW(groups)
    x = torch.randn(1, 16, 64)
    out = dit(hidden_states=x, timestep=torch.tensor([0.5]), encoder_hidden_states=torch.randn(1, 5, 256),
              img_shapes=[[(1, 4, 4)]], return_dict=False)[0]
    out.pow(2).mean().backward()
    opt.step()
    assert all(torch.equal(v, before[k]) for k, v in dit.state_dict().items())
    assert any(l.lora_up.weight.abs().sum() > 0 for l in net.unet_loras)


def test_learning_moves_generation_toward_training_images(tmp_path):
    models, toml = make_cached_dataset(tmp_path, "original", n=2, colours=["red"], batch_size=1)
    result = train_main(train_args(models, toml, tmp_path / "out", "original", "--max_train_steps", "200",
                                   "--learning_rate", "1e-2", "--network_dim", "16", "--network_alpha", "16",
                                   "--timestep_sampling", "uniform", "--lr_scheduler", "constant"))
    # the training loss on fixed noise / timesteps, without and with the trained LoRA
    eval_before, eval_after = fixed_loss(models, toml), fixed_loss(models, toml, result["final"])
    print(f"fixed-sample training loss: base {eval_before:.4f} -> with LoRA {eval_after:.4f}")
    assert eval_after < 0.8 * eval_before
    caption = (tmp_path / "data" / "img000.txt").read_text()
    train_lat = torch.stack([read_latent_cache(p)[0] for p in (tmp_path / "cache").glob("*_qi.safetensors")])
    target = train_lat.mean(0)
    common = ["--dit", str(models["dit"]), "--vae", str(models["vae"]), "--text_encoder", str(models["text_encoder"]),
              "--prompt", caption, "--image_size", "64", "64", "--infer_steps", "20", "--guidance_scale", "1.0",
              "--output_type", "latent", "--device", "cpu"]
    dists = {}
    for tag, extra in (("before", []), ("after", ["--lora_weight", str(result["final"])])):
        d = []
        for seed in (1, 2, 3):
            p = generate_main(common + ["--seed", str(seed), "--save_path", str(tmp_path / tag)] + extra)[0]
            d.append((load_file(str(p))["latent"] - target).pow(2).mean().item())
        dists[tag] = float(np.mean(d))
    print(f"latent MSE to the training image: before {dists['before']:.3f}, after {dists['after']:.3f}")
    assert dists["after"] < 0.75 * dists["before"]


def fixed_loss(models, toml, lora=None, seeds=24):
    import argparse

    from musubi_tuner.dataset.config import load_dataset_config
    from musubi_tuner.dataset.items import collect_items
    from musubi_tuner.dataset.loader import CachedBatches, check_caches
    from musubi_tuner.networks.lora_files import linear_module_names, load_lora, merge_lora
    from musubi_tuner.training.loss import flow_matching_loss, sample_generators

    version = VERSIONS["original"]
    model = load_dit(models["dit"], version, torch.float32)
    if lora:
        merge_lora(model, load_lora(lora, linear_module_names(model)))
    data = CachedBatches(check_caches(collect_items(load_dataset_config(toml), version), version), seed=0)
    args = argparse.Namespace(timestep_sampling="uniform", discrete_flow_shift=1.0, sigmoid_scale=1.0, logit_mean=0.0,
                              logit_std=1.0, mode_scale=1.29, weighting_scheme="none", min_timestep=0.0,
                              max_timestep=1000.0, remove_first_image_from_target=False)
    with torch.no_grad():
        losses = [flow_matching_loss(model, data[(0, i)], version, args,
                                     sample_generators(s, data[(0, i)]["sample_keys"]), "cpu", torch.float32).item()
                  for s in range(seeds) for i in range(len(data))]
    return float(np.mean(losses))


def test_saved_lora_loads_in_diffusers_with_same_output(tmp_path):
    pytest.importorskip("peft")
    from test_generate import reference_pipeline

    from musubi_tuner.networks.lora_files import linear_module_names, load_lora, merge_lora

    models, toml = make_cached_dataset(tmp_path, "original", n=2)
    result = train_main(train_args(models, toml, tmp_path / "out", "original", "--max_train_steps", "3",
                                   "--learning_rate", "5e-2", "--network_dim", "4", "--network_alpha", "2"))
    with safe_open(str(result["final"]), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_base_model_version"] == "qwen_image" and meta["ss_timestep_sampling"] == "shift"
    assert len(meta["sshs_model_hash"]) == 64 and '"num_images": 2' in meta["ss_datasets"]

    call = dict(prompt="a red circle", height=64, width=64, num_inference_steps=3, true_cfg_scale=1.0,
                output_type="latent")
    pipe = reference_pipeline()
    pipe.load_lora_weights(str(result["final"]))
    theirs = pipe(**call, generator=torch.Generator("cpu").manual_seed(0)).images
    ours_pipe = reference_pipeline()
    merge_lora(ours_pipe.transformer, load_lora(result["final"], linear_module_names(ours_pipe.transformer)))
    ours = ours_pipe(**call, generator=torch.Generator("cpu").manual_seed(0)).images
    plain = reference_pipeline()(**call, generator=torch.Generator("cpu").manual_seed(0)).images
    assert (ours - plain).abs().mean() > 1e-4
    assert torch.allclose(theirs, ours, atol=1e-4)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_interrupt_and_resume_equals_uninterrupted_run(tmp_path, monkeypatch, optimizer):
    """Also with bitsandbytes' 8-bit AdamW (the spec's example optimizer): its quantised states survive the state
    folder (loaded with weights_only) and the resumed run continues exactly."""
    models, toml = make_cached_dataset(tmp_path, "original", n=6, batch_size=2)
    common = ["--max_train_steps", "7", "--learning_rate", "1e-2", "--network_dim", "4", "--lr_scheduler", "cosine",
              "--lr_warmup_steps", "2", "--gradient_accumulation_steps", "1", "--optimizer_type", optimizer]
    if optimizer == "adamw8bit":  # bitsandbytes keeps tensors under 4096 elements in 32 bits; the tiny LoRA is smaller
        common += ["--optimizer_args", "min_8bit_size=0"]
    full = train_main(train_args(models, toml, tmp_path / "full", "original", *common))

    def ctrl_c(step):
        if step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer_mod, "after_optimizer_step", ctrl_c)
    with pytest.raises(SystemExit) as e:
        train_main(train_args(models, toml, tmp_path / "part", "original", *common))
    assert e.value.code == 130
    state = tmp_path / "part" / "lora-interrupted-state"
    assert (state / "train_state.json").exists() and not (tmp_path / "part" / "lora.safetensors").exists()
    def matrices(d):  # the per-parameter moment tensors (bitsandbytes nests them one dict deeper)
        for v in d.values():
            yield from matrices(v) if isinstance(v, dict) else ([v] if torch.is_tensor(v) and v.ndim == 2 else [])

    saved = torch.load(state / "optimizer.pt", weights_only=True)["state"]
    assert {v.dtype for v in matrices(saved)} == ({torch.uint8} if optimizer == "adamw8bit" else {torch.float32})
    monkeypatch.setattr(trainer_mod, "after_optimizer_step", lambda step: None)
    resumed = train_main(train_args(models, toml, tmp_path / "part", "original", *common, "--resume", str(state)))
    assert resumed["steps"] == 7
    a, b = load_file(str(full["final"])), load_file(str(resumed["final"]))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    assert np.allclose(full["losses"][4:], resumed["losses"], atol=1e-6)  # the same loss curve continues


def test_nan_loss_stops_with_step(tmp_path, capsys):
    models, toml = make_cached_dataset(tmp_path, "original", n=2)
    with pytest.raises(SystemExit):
        train_main(train_args(models, toml, tmp_path / "out", "original", "--max_train_steps", "3",
                              "--learning_rate", "1e30", "--max_grad_norm", "0", "--optimizer_type",
                              "torch.optim.SGD"))
    err = capsys.readouterr().err
    assert "error: loss is" in err and "at step" in err


@pytest.mark.parametrize("flags,words", [(["--flash_attn"], ["--flash_attn", "--sdpa"]),
                                         (["--xformers", "--sage_attn"], ["--xformers", "--sage_attn", "one"]),
                                         (["--flash3"], ["--flash3", "cannot be used", "--flash_attn"])])
def test_attention_flag_errors_before_loading(tmp_path, capsys, monkeypatch, flags, words):
    import importlib.util

    if flags == ["--flash_attn"] and importlib.util.find_spec("flash_attn"):
        pytest.skip("flash_attn is installed here")
    models, toml = make_cached_dataset(tmp_path, "original", n=2)
    monkeypatch.setattr(trainer_mod, "load_dit_with_options", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(SystemExit):
        train_main(train_args(models, toml, tmp_path / "out", "original", "--max_train_steps", "1", *flags))
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and all(w in err[0] for w in words), err


def test_missing_cache_is_a_clear_error(tmp_path, capsys):
    models, toml = make_cached_dataset(tmp_path, "original", n=2)
    for p in (tmp_path / "cache").glob("*_te.safetensors"):
        p.unlink()
    with pytest.raises(SystemExit):
        train_main(train_args(models, toml, tmp_path / "out", "original", "--max_train_steps", "1"))
    err = capsys.readouterr().err
    assert "qwen_image_cache_text_encoder_outputs.py" in err and "missing" in err


@pytest.mark.parametrize("version", ["edit-2509", "layered", "layered-remove-first"])
def test_sampling_during_training_for_edit_and_layered(tmp_path, version):
    """Sample lines without --w/--h get the training data's size (the dataset's bucket of the --ci image, here 64x64,
    not the official 1M pixels), and layered samples are named by what they hold."""
    from PIL import Image

    name = version.removesuffix("-remove-first")
    models, toml = make_cached_dataset(tmp_path, name, n=2)
    ctrl = sorted((tmp_path / ("data_control" if name != "layered" else "data")).glob("*.png"))[0]
    prompts = tmp_path / "prompts.txt"
    extra = "--f 2" if name == "layered" else f"--ci {ctrl}"  # edit-2509: two control images
    prompts.write_text(f"a shape --ci {ctrl} {extra} --s 3 --d 5\n")
    remove_first = ["--remove_first_image_from_target"] if version.endswith("remove-first") else []
    result = train_main(train_args(models, toml, tmp_path / "out", name, "--max_train_steps", "2",
                                   "--sample_prompts", str(prompts), "--sample_every_n_steps", "2", *remove_first))
    samples = sorted(result["sample_dir"].glob("*.png"))
    suffixes = sorted(p.stem.rsplit("_", 1)[1] for p in samples)
    if name == "layered":
        assert suffixes == (["layer1", "layer2", "layer3"] if remove_first else ["composite", "layer1", "layer2"])
    else:
        assert len(samples) == 1
    assert all(Image.open(p).size == (64, 64) for p in samples)
    assert Image.open(samples[0]).mode == ("RGBA" if name == "layered" else "RGB")
    with safe_open(str(result["final"]), "pt") as f:
        assert f.metadata()["ss_remove_first_image_from_target"] == str(bool(remove_first))


def test_spec_command_shape_with_bf16_mixed_precision(tmp_path):
    """The documented options (bf16, sdpa, shift sampling, checkpointing, workers) run a step on CPU."""
    models, toml = make_cached_dataset(tmp_path, "original", n=2)
    args = train_args(models, toml, tmp_path / "out", "original", "--max_train_steps", "2")
    args[args.index("--max_data_loader_n_workers") + 1] = "2"
    r = train_main(args + ["--sdpa", "--mixed_precision", "bf16", "--timestep_sampling", "shift", "--weighting_scheme",
                           "none", "--discrete_flow_shift", "2.2", "--learning_rate", "5e-5", "--gradient_checkpointing",
                           "--persistent_data_loader_workers", "--network_module", "networks.lora_qwen_image",
                           "--network_dim", "16", "--save_every_n_epochs", "1"])
    assert r["steps"] == 2 and all(math.isfinite(x) for x in r["losses"])
    with safe_open(str(r["final"]), "pt") as f:
        assert f.metadata()["ss_mixed_precision"] == "bf16"


def test_third_party_network_module_by_import_path(tmp_path):
    models, toml = make_cached_dataset(tmp_path, "original", n=2)
    r = train_main(train_args(models, toml, tmp_path / "out", "original", "--max_train_steps", "3",
                              "--network_module", "fake_kohya_net", "--learning_rate", "1e-2"))
    gains = load_file(str(r["final"]))
    assert len(gains) == 2 and any(g.abs().sum() > 0 for g in gains.values())


def test_epoch_run_metadata(tmp_path):
    """ss_epoch and ss_max_train_steps say what the run did (2 epochs of 2 steps: 4 steps, epoch 2)."""
    models, toml = make_cached_dataset(tmp_path, "original", n=2, batch_size=1)
    r = train_main(train_args(models, toml, tmp_path / "out", "original", "--max_train_epochs", "2",
                              "--save_every_n_epochs", "1"))
    assert r["steps"] == 4
    for file, epoch, steps in (("lora-000001.safetensors", "1", "2"), ("lora.safetensors", "2", "4"),
                               ("lora-000002.safetensors", "2", "4")):
        with safe_open(str(tmp_path / "out" / file), "pt") as f:
            md = f.metadata()
        assert (md["ss_epoch"], md["ss_steps"], md["ss_max_train_steps"]) == (epoch, steps, "4"), file


def test_save_every_and_save_last_n_and_precision(tmp_path):
    models, toml = make_cached_dataset(tmp_path, "original", n=2, batch_size=1)  # 2 steps per epoch
    out = tmp_path / "out"
    train_main(train_args(models, toml, out, "original", "--max_train_steps", "7", "--save_every_n_steps", "1",
                          "--save_last_n_steps", "2", "--save_every_n_epochs", "1", "--save_last_n_epochs", "1",
                          "--save_state", "--save_precision", "bf16"))
    names = sorted(p.name for p in out.iterdir() if p.name.startswith("lora"))
    assert "lora-step00000006.safetensors" in names and "lora-step00000005.safetensors" in names
    assert "lora-step00000004.safetensors" not in names and "lora-step00000004-state" not in names
    assert "lora-000003.safetensors" in names and "lora-000002.safetensors" not in names
    assert "lora.safetensors" in names and "lora-state" in names
    assert all(v.dtype == torch.bfloat16 for k, v in load_file(str(out / "lora.safetensors")).items()
               if not k.endswith(".alpha"))


def test_network_args_patterns_dropouts_and_loraplus():
    from musubi_tuner.networks.lora_qwen_image import create_network
    from musubi_tuner.qwen_image.tiny import tiny_dit

    dit = tiny_dit()
    all_mods = create_network(1.0, 4, 4, None, None, dit)
    assert len(all_mods.unet_loras) == 28
    dit = tiny_dit()
    net = create_network(1.0, 4, 4, None, None, dit, exclude_patterns="[r'.*(img_mod|txt_mod).*']",
                         include_patterns="[r'.*\\.0\\.img_mod.*']", rank_dropout="0.5", module_dropout="0.1",
                         loraplus_lr_ratio="16")
    names = {l.module_name for l in net.unet_loras}
    assert "transformer_blocks.0.img_mod.1" in names and "transformer_blocks.1.img_mod.1" not in names
    assert "transformer_blocks.0.txt_mod.1" not in names and len(names) == 28 - 4 + 1
    groups, _ = net.prepare_optimizer_params(unet_lr=1e-4)
    assert [g["lr"] for g in groups] == [1e-4, 1.6e-3]
    assert net.unet_loras[0].rank_dropout == 0.5 and net.unet_loras[0].module_dropout == 0.1


def test_continue_lora_and_base_weights(tmp_path):
    models, toml = make_cached_dataset(tmp_path, "original", n=2)
    first = train_main(train_args(models, toml, tmp_path / "a", "original", "--max_train_steps", "2",
                                  "--learning_rate", "1e-2", "--network_dim", "4"))["final"]
    # continuing starts from the saved weights: zero learning rate keeps them exactly
    cont = train_main(train_args(models, toml, tmp_path / "b", "original", "--max_train_steps", "1",
                                 "--learning_rate", "0", "--network_dim", "4", "--network_weights", str(first)))
    a, b = load_file(str(first)), load_file(str(cont["final"]))
    assert all(torch.equal(a[k], b[k]) for k in a)
    dim = train_main(train_args(models, toml, tmp_path / "c", "original", "--max_train_steps", "1",
                                "--learning_rate", "0", "--network_dim", "8", "--network_weights", str(first),
                                "--dim_from_weights"))
    assert load_file(str(dim["final"]))[next(k for k in a if k.endswith("lora_down.weight"))].shape[0] == 4
    # base weights: the LoRA is merged into the DiT first, so training on top sees a different loss
    base = train_main(train_args(models, toml, tmp_path / "d", "original", "--max_train_steps", "1",
                                 "--learning_rate", "0", "--base_weights", str(first),
                                 "--base_weights_multiplier", "1.0"))
    plain = train_main(train_args(models, toml, tmp_path / "e", "original", "--max_train_steps", "1",
                                  "--learning_rate", "0"))
    assert base["losses"][0] != plain["losses"][0]
