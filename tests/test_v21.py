"""Qwen-Image-2.1: our generation equals diffusers' QwenImage21Pipeline on tiny random weights in the real layouts
(the pipeline loads the checkpoint folder itself), and the loaders read every layout the same."""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import QwenImage21Pipeline
from PIL import Image
from safetensors import safe_open

from musubi_tuner.fileio import save_safetensors
from musubi_tuner.qwen_image import tiny
from musubi_tuner.qwen_image_21 import modeling as v21
from musubi_tuner.qwen_image_generate_image import main as generate_main

SAMPLE_SIGMAS = [1.0, 0.8, 0.55, 0.3, 0.1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny.write_tiny_v21(tmp_path_factory.mktemp("qi21"), sample_sigmas=SAMPLE_SIGMAS)


@pytest.fixture(scope="module")
def pipe(ckpt):
    return QwenImage21Pipeline.from_pretrained(str(ckpt["root"]), dtype=torch.float32)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cond")
    rng = np.random.default_rng(0)
    paths = []
    for i, (w, h) in enumerate([(96, 64), (64, 80)]):
        arr = rng.integers(0, 256, (h, w, 4 if i == 1 else 3), dtype=np.uint8)
        if i == 1:
            arr[..., 3] = np.where(np.arange(w)[None, :] < w // 2, 255, 60)  # partly transparent
        paths.append(folder / f"c{i}.png")
        Image.fromarray(arr).save(paths[-1])
    return paths


def run_ours(ckpt, out, *extra, dit=None):
    return generate_main(["--model_version", "2.1", "--dit", str(dit or ckpt["dit"]), "--vae", str(ckpt["vae"]),
                          "--text_encoder", str(ckpt["text_encoder"]), "--tokenizer", str(ckpt["tokenizer"]),
                          "--save_path", str(out), "--device", "cpu", *extra])


def saved_latent(paths):
    lat = [p for p in paths if p.suffix == ".safetensors"][0]
    with safe_open(str(lat), "pt") as f:
        return f.get_tensor("latent"), f.metadata()


def test_prompt_embeddings_equal_the_pipeline(ckpt, pipe, images):
    processor = v21.load_processor(str(ckpt["tokenizer"]), None)
    te = v21.load_text_encoder(ckpt["text_encoder"], torch.float32)
    prompts = ["a red cube on a blue floor", "x"]  # different lengths: left padding in the encoder, right after
    ours = v21.batch_prompts(v21.encode_prompts(te, processor, prompts))
    ref = pipe.encode_prompt(prompts, device="cpu")
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1]) and torch.equal(ours[2], ref[2])
    conds = [v21.prepare_condition(Image.open(p), 64) for p in images]
    ours = v21.batch_prompts(v21.encode_prompts(te, processor, ["put them together"], conds))
    ref = pipe.encode_prompt(["put them together"], image=conds, device="cpu")
    assert torch.equal(ours[0], ref[0]) and torch.equal(ours[2], ref[2])
    assert ours[2].sum() == sum(c.size[0] * c.size[1] // 32 ** 2 for c in conds)  # one slot per 32x32 pixels


@pytest.mark.parametrize("cfg,kv", [(1.0, True), (3.0, True), (3.0, False)])
def test_condition_images_equal_the_pipeline(tmp_path, ckpt, pipe, images, cfg, kv):
    """--infer_steps N replaces the checkpoint's sample_sigmas by linspace(1, 1/N) (the pipeline's `sigmas=`)."""
    prompt, negative, seed = "the shape of picture 1 in the colour of picture 2", "blurry", 11
    ref = pipe(prompt, image=[Image.open(p) for p in images], negative_prompt=negative if cfg > 1 else None,
               true_cfg_scale=cfg, sigmas=list(np.linspace(1, 1 / 4, 4)), output_resolution=64, use_kv_cache=kv,
               generator=torch.Generator().manual_seed(seed), output_type="latent").images
    saved = run_ours(ckpt, tmp_path, "--prompt", prompt, "--negative_prompt", negative, "--guidance_scale", str(cfg),
                     "--control_image_path", *map(str, images), "--output_resolution", "64", "--infer_steps", "4",
                     "--seed", str(seed), "--output_type", "latent", *([] if kv else ["--no_kv_cache"]))
    lat, meta = saved_latent(saved)
    # the output takes the last condition image's aspect (64x80 -> 64x64 at 64^2 pixels, rounded to 32)
    assert lat.shape == (16, 1, 4, 4)
    assert (v21.pack(lat.unsqueeze(0)) - ref).abs().max() < 1e-4
    assert meta["model_version"] == "2.1" and meta["control_images"] == "|".join(map(str, images))


def test_text_to_image_equals_the_pipeline_with_sample_sigmas(tmp_path, ckpt, pipe):
    """No --infer_steps: the checkpoint's sample_sigmas (model_index.json), as the pipeline; the image is RGBA."""
    prompt, seed = "a cat", 3
    ref = pipe(prompt, height=64, width=96, generator=torch.Generator().manual_seed(seed), output_type="np").images[0]
    saved = run_ours(ckpt, tmp_path, "--prompt", prompt, "--image_size", "64", "96", "--seed", str(seed),
                     "--output_type", "latent_images")
    png = [p for p in saved if p.suffix == ".png"][0]
    ours = np.asarray(Image.open(png), dtype=np.float32) / 255
    assert ours.shape == ref.shape == (64, 96, 4)
    assert np.abs(ours - ref).max() <= 1 / 255 + 1e-6
    lat, meta = saved_latent(saved)
    assert meta["infer_steps"] == str(len(SAMPLE_SIGMAS)) and meta["guidance_scale"] == "1.0"  # no CFG by default


def test_sigmas_follow_the_scheduler_and_its_shift(ckpt):
    config, sample = v21.scheduler_settings(ckpt["dit"])
    assert sample == SAMPLE_SIGMAS and config["use_dynamic_shifting"]
    a, b = v21.sigmas_for(None, 256, config, sample), v21.sigmas_for(None, 4096, config, sample)
    assert len(a) == len(SAMPLE_SIGMAS) + 1 and a[-1] == 0 and a[0] == 1
    assert torch.all(b[1:-2] > a[1:-2]) and a[-2] == b[-2] == pytest.approx(0.02)  # more noise for larger images
    # without a scheduler config (a single-file DiT): linspace, mu = 0.5 + 0.4 (n - 256) / 7936 over the target's n
    # tokens, exponential shift, stretched to a terminal 0.02, then 0 (FACTS.md)
    config, sample = v21.scheduler_settings(ckpt["dit_comfy"])
    assert sample is None
    for steps, n in ((40, 4096), (8, 300)):
        s = np.linspace(1, 1 / steps, steps)
        mu = 0.5 + 0.4 * (n - 256) / 7936
        s = np.exp(mu) / (np.exp(mu) + (1 / s - 1))
        one_minus = 1 - s
        s = 1 - one_minus / (one_minus[-1] / (1 - 0.02))
        want = torch.tensor(list(s) + [0.0], dtype=torch.float32)
        assert torch.allclose(v21.sigmas_for(steps, n, config), want, atol=1e-6)


def test_every_dit_layout_loads_the_same_weights(tmp_path, ckpt):
    ref = v21.load_dit(ckpt["dit"], torch.float32).state_dict()
    from diffusers import QwenImage21Transformer2DModel

    QwenImage21Transformer2DModel.from_pretrained(str(ckpt["dit"])).save_pretrained(tmp_path / "sharded",
                                                                                   max_shard_size="200KB")
    assert len(list((tmp_path / "sharded").glob("*-of-*.safetensors"))) > 1
    bare = tmp_path / "bare.safetensors"  # a single file without config.json: the config from the shapes
    save_safetensors({k: v for k, v in ref.items()}, bare)
    for path in (ckpt["dit_comfy"], tmp_path / "sharded", bare):
        sd = v21.load_dit(path, torch.float32).state_dict()
        assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref), path


def test_text_encoder_single_files_equal_the_folder(tmp_path, ckpt):
    processor = v21.load_processor(str(ckpt["tokenizer"]), None)
    folder = v21.load_text_encoder(ckpt["text_encoder"], torch.float32)
    want = v21.encode_prompts(folder, processor, ["hello there"])[0][0]
    with safe_open(str(ckpt["text_encoder"] / "model.safetensors"), "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    old_names = {("model." + k[len("model.language_model."):]) if k.startswith("model.language_model.") else
                 k[len("model."):] if k.startswith("model.visual.") else k: v for k, v in sd.items()}
    for name, state in (("transformers.safetensors", sd), ("comfy.safetensors", old_names)):
        (tmp_path / name.split(".")[0]).mkdir()
        path = tmp_path / name.split(".")[0] / name  # no config.json beside it
        save_safetensors(state, path)
        te = v21.load_text_encoder(path, torch.float32, tokenizer=processor.tokenizer)
        assert torch.equal(v21.encode_prompts(te, processor, ["hello there"])[0][0], want), name


def test_wrong_files_and_options_are_refused_before_loading(tmp_path, ckpt, tiny_models, capsys):
    def refused(run, *args, **kw):
        with pytest.raises(SystemExit):
            run(*args, **kw)
        return capsys.readouterr().err

    assert "is a Qwen-Image DiT, not one of Qwen-Image-2.1" in refused(run_ours, ckpt, tmp_path, "--prompt", "x",
                                                                       dit=tiny_models["dit"])
    assert "pass --model_version 2.1" in refused(generate_main, [
        "--dit", str(ckpt["dit"]), "--vae", str(tiny_models["vae"]), "--text_encoder", str(tiny_models["text_encoder"]),
        "--prompt", "x", "--save_path", str(tmp_path), "--device", "cpu"])
    assert "Qwen3-VL" in refused(run_ours, ckpt, tmp_path, "--prompt", "x", "--text_encoder",
                                 str(tiny_models["text_encoder"]))
    assert "multiples of 32; try 64 64" in refused(run_ours, ckpt, tmp_path, "--prompt", "x", "--image_size", "48", "64")
    assert "--mask_path does not apply" in refused(run_ours, ckpt, tmp_path, "--prompt", "x", "--mask_path", "m.png")
    assert not list(tmp_path.glob("*.png"))


# --- caching and training ------------------------------------------------------------------------------------------

def write_overfit_dataset(root, ckpt, repeats=10):
    """One 64x64 picture with one condition image and the caption 'zzz', cached with the 2.1 models."""
    from musubi_tuner.qwen_image_cache_latents import main as cache_latents
    from musubi_tuner.qwen_image_cache_text_encoder_outputs import main as cache_text

    (root / "img").mkdir(parents=True)
    (root / "ctl").mkdir()
    yy, xx = np.mgrid[0:64, 0:64]
    target = np.zeros((64, 64, 3), np.uint8)
    target[(yy - 32) ** 2 + (xx - 32) ** 2 < 300] = (230, 40, 40)
    target[..., 2] += 60
    Image.fromarray(target).save(root / "img" / "a.png")
    (root / "img" / "a.txt").write_text("zzz")
    Image.fromarray(np.full((64, 64, 3), (20, 200, 90), np.uint8)).save(root / "ctl" / "a.png")
    toml = root / "d.toml"
    toml.write_text(f'[general]\nresolution = [64, 64]\nbatch_size = 1\n[[datasets]]\nimage_directory = "{root / "img"}"\n'
                    f'cache_directory = "{root / "cache"}"\ncontrol_directory = "{root / "ctl"}"\nnum_repeats = {repeats}\n')
    common = ["--dataset_config", str(toml), "--model_version", "2.1", "--device", "cpu", "--skip_existing"]
    cache_latents(common + ["--vae", str(ckpt["vae"])])
    cache_text(common + ["--text_encoder", str(ckpt["text_encoder"]), "--tokenizer", str(ckpt["tokenizer"])])
    return toml


def model_args(ckpt):
    return ["--dit", str(ckpt["dit"]), "--vae", str(ckpt["vae"]), "--text_encoder", str(ckpt["text_encoder"]),
            "--tokenizer", str(ckpt["tokenizer"]), "--model_version", "2.1", "--device", "cpu",
            "--max_data_loader_n_workers", "0", "--seed", "42"]


def test_caches_hold_embeddings_slots_and_condition_latents(tmp_path, ckpt):
    from musubi_tuner.dataset.cache import read_image_slots, read_latent_cache

    toml = write_overfit_dataset(tmp_path, ckpt)
    (lat_file,) = (tmp_path / "cache").glob("a_0064x0064_qi21.safetensors")
    (txt_file,) = (tmp_path / "cache").glob("a_qi21_te.safetensors")
    latents, controls = read_latent_cache(lat_file)
    assert latents.shape == (16, 1, 4, 4) and len(controls) == 1 and controls[0].shape == (16, 1, 4, 4)
    slots = read_image_slots(txt_file)
    assert slots.sum() == 4  # a 64x64 condition image: (64/32)^2 slots
    # the cached embeddings are the pipeline's for that prompt and image (RGBA, as the pipeline feeds its encoder)
    pipe = QwenImage21Pipeline.from_pretrained(str(ckpt["root"]), dtype=torch.float32)
    ref, _, ref_slots = pipe.encode_prompt("zzz", image=[Image.open(tmp_path / "ctl" / "a.png").convert("RGBA")],
                                           device="cpu")
    with safe_open(str(txt_file), "pt") as f:
        embeds = f.get_tensor("varlen_vl_embed_bfloat16")  # stored in bf16, as musubi-tuner stores text caches
    assert torch.equal(embeds, ref[0].to(torch.bfloat16)) and torch.equal(slots, ref_slots[0])
    # a changed caption makes the text cache stale and it is rebuilt; the latents stay
    before = lat_file.stat().st_mtime_ns
    (tmp_path / "img" / "a.txt").write_text("yyy")
    from musubi_tuner.qwen_image_cache_latents import main as cache_latents
    from musubi_tuner.qwen_image_cache_text_encoder_outputs import main as cache_text

    common = ["--dataset_config", str(toml), "--model_version", "2.1", "--device", "cpu", "--skip_existing"]
    assert cache_latents(common + ["--vae", str(ckpt["vae"])])["cached"] == 0
    assert cache_text(common + ["--text_encoder", str(ckpt["text_encoder"]), "--tokenizer",
                                str(ckpt["tokenizer"])])["cached"] == 1
    with safe_open(str(txt_file), "pt") as f:
        assert f.metadata()["caption1"] == "yyy"
    assert lat_file.stat().st_mtime_ns == before


def test_lora_learns_and_loads_in_diffusers(tmp_path, ckpt):
    """A LoRA trained here on one picture (with its condition image) makes diffusers' own pipeline, with the LoRA
    loaded by QwenImageLoraLoaderMixin, generate latents much closer to that picture: the training target, timestep
    scale and condition layout agree with the reference sampler. Our --lora_weight gives the pipeline's numbers."""
    from musubi_tuner.convert_lora import main as convert
    from musubi_tuner.dataset.cache import read_latent_cache
    from musubi_tuner.qwen_image_train_network import main as train

    toml = write_overfit_dataset(tmp_path, ckpt)
    result = train(model_args(ckpt) + [
        "--dataset_config", str(toml), "--output_dir", str(tmp_path / "out"), "--output_name", "lora",
        "--network_module", "networks.lora_qwen_image", "--network_dim", "8", "--max_train_steps", "300",
        "--learning_rate", "1e-2", "--optimizer_type", "adamw"])
    converted = convert(["--input", str(result["final"]), "--output", str(tmp_path / "lora_diffusers.safetensors"),
                         "--target", "transformer"])
    target = v21.pack(read_latent_cache(next((tmp_path / "cache").glob("*qi21.safetensors")))[0][None])
    pipe = QwenImage21Pipeline.from_pretrained(str(ckpt["root"]), dtype=torch.float32)
    cond = [Image.open(tmp_path / "ctl" / "a.png")]
    sigmas = list(np.linspace(1, 1 / 8, 8))

    def distance():
        return np.mean([((pipe("zzz", image=cond, output_resolution=64, sigmas=sigmas, output_type="latent",
                                generator=torch.Generator().manual_seed(s)).images - target) ** 2).mean().item()
                        for s in range(4)])

    before = distance()
    pipe.load_lora_weights(str(converted))
    after = distance()
    print(f"2.1 LoRA: latent MSE to the training picture {before:.3f} -> {after:.3f}")
    assert after < 0.5 * before  # measured 1.45 -> 0.47; a flipped target gives 1.9, t x 1000 gives 0.95
    ref = pipe("zzz", image=cond, output_resolution=64, sigmas=sigmas, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images
    saved = run_ours(ckpt, tmp_path / "gen", "--prompt", "zzz", "--control_image_path", str(tmp_path / "ctl" / "a.png"),
                     "--output_resolution", "64", "--infer_steps", "8", "--seed", "0", "--output_type", "latent",
                     "--lora_weight", str(result["final"]))
    assert (v21.pack(saved_latent(saved)[0][None]) - ref).abs().max() < 1e-4
    # --save_merged_model writes the DiT with the LoRA in it: it generates what --lora_weight generates
    merged = run_ours(ckpt, tmp_path, "--save_merged_model", str(tmp_path / "merged.safetensors"), "--lora_weight",
                      str(result["final"]))[0]
    again = run_ours(ckpt, tmp_path / "gen2", "--prompt", "zzz", "--control_image_path", str(tmp_path / "ctl" / "a.png"),
                     "--output_resolution", "64", "--infer_steps", "8", "--seed", "0", "--output_type", "latent",
                     dit=merged)
    assert (saved_latent(again)[0] - saved_latent(saved)[0]).abs().max() < 1e-5


def test_full_finetune_with_sampling_and_validation(tmp_path, ckpt):
    from musubi_tuner.qwen_image_train import main as train_full

    toml = write_overfit_dataset(tmp_path, ckpt, repeats=2)
    toml.write_text(toml.read_text().replace("batch_size = 1", "batch_size = 2"))
    (tmp_path / "prompts.txt").write_text(f"zzz --ci {tmp_path / 'ctl' / 'a.png'} --s 3 --d 1\n"
                                          "a cat --w 96 --h 64 --s 2 --l 2.0 --n blurry\n")
    result = train_full(model_args(ckpt) + [
        "--dataset_config", str(toml), "--output_dir", str(tmp_path / "out"), "--output_name", "full",
        "--max_train_steps", "3", "--learning_rate", "1e-4", "--optimizer_type", "adamw",
        "--sample_prompts", str(tmp_path / "prompts.txt"), "--sample_at_first", "--sample_every_n_steps", "3",
        "--save_precision", "bf16"])
    samples = sorted((tmp_path / "out" / "sample").glob("*.png"))
    assert len(samples) == 4 and Image.open(samples[0]).mode == "RGBA"
    assert Image.open([s for s in samples if s.name.endswith("_01_42.png")][0]).size == (96, 64)
    trained = v21.load_dit(result["final"], torch.float32).state_dict()
    init = v21.load_dit(ckpt["dit"], torch.float32).state_dict()
    assert trained.keys() == init.keys() and any(not torch.equal(trained[k].float(), init[k].bfloat16().float())
                                                 for k in init)


def test_memory_options_on_2_1(tmp_path, ckpt):
    """Block swap over 2.1's blocks changes nothing; fp8 scaled weights stay close; LoRA training runs with fp8, block
    swap and gradient checkpointing and gives the plain run's first loss."""
    from musubi_tuner.qwen_image_train_network import main as train

    common = ["--prompt", "x", "--image_size", "64", "64", "--infer_steps", "4", "--seed", "3", "--output_type", "latent"]
    plain = saved_latent(run_ours(ckpt, tmp_path / "a", *common))[0]
    swap = saved_latent(run_ours(ckpt, tmp_path / "b", *common, "--blocks_to_swap", "1"))[0]
    assert torch.equal(swap, plain)
    q = saved_latent(run_ours(ckpt, tmp_path / "c", *common, "--fp8_scaled", "--fp8_vl", "--blocks_to_swap", "1"))[0]
    rel = ((q - plain).norm() / plain.norm()).item()
    assert 0 < rel < 0.1, rel
    q_dit = saved_latent(run_ours(ckpt, tmp_path / "d", *common, "--fp8_scaled", "--blocks_to_swap", "1"))[0]
    assert not torch.equal(q, q_dit)  # --fp8_vl quantises the Qwen3-VL encoder too
    toml = write_overfit_dataset(tmp_path / "data", ckpt, repeats=2)
    runs = [train(model_args(ckpt) + ["--dataset_config", str(toml), "--output_dir", str(tmp_path / f"o{i}"),
                                      "--output_name", "lora", "--network_module", "networks.lora_qwen_image",
                                      "--max_train_steps", "2", "--learning_rate", "1e-2", *extra])
            for i, extra in enumerate([[], ["--blocks_to_swap", "1", "--gradient_checkpointing"],
                                       ["--fp8_base", "--fp8_scaled", "--blocks_to_swap", "1"]])]
    assert runs[1]["losses"] == pytest.approx(runs[0]["losses"], rel=1e-5)
    assert all(np.isfinite(runs[2]["losses"])) and runs[2]["losses"][0] == pytest.approx(runs[0]["losses"][0], rel=0.1)


def test_the_repository_folder_is_enough(tmp_path, ckpt):
    """--dit / --vae / --text_encoder all given the diffusers repository folder; the processor is found in it."""
    root = str(ckpt["root"])
    a = generate_main(["--model_version", "2.1", "--dit", root, "--vae", root, "--text_encoder", root, "--prompt", "x",
                       "--image_size", "64", "64", "--infer_steps", "2", "--seed", "1", "--output_type", "latent",
                       "--save_path", str(tmp_path / "a"), "--device", "cpu"])
    b = run_ours(ckpt, tmp_path / "b", "--prompt", "x", "--image_size", "64", "64", "--infer_steps", "2", "--seed", "1",
                 "--output_type", "latent")
    assert torch.equal(saved_latent(a)[0], saved_latent(b)[0])


def test_batched_loss_equals_each_sample_alone(tmp_path, ckpt):
    """Prompts of different lengths in one batch: each sample's loss is the loss it has alone (the DiT would lay the
    batch out by the first sample's slots); equal lengths run as one batch and agree too."""
    import argparse

    from musubi_tuner.dataset.config import load_dataset_config
    from musubi_tuner.dataset.items import collect_items
    from musubi_tuner.dataset.loader import check_caches, load_items
    from musubi_tuner.models.registry import VERSIONS
    from musubi_tuner.training.loss import per_sample_loss

    toml = write_overfit_dataset(tmp_path, ckpt)
    (tmp_path / "img" / "b.png").write_bytes((tmp_path / "img" / "a.png").read_bytes())
    (tmp_path / "img" / "b.txt").write_text("a much longer caption than the first one")
    (tmp_path / "img" / "c.png").write_bytes((tmp_path / "img" / "a.png").read_bytes())
    (tmp_path / "img" / "c.txt").write_text("zz!")  # as long as "zzz"
    for n in "bc":
        (tmp_path / "ctl" / f"{n}.png").write_bytes((tmp_path / "ctl" / "a.png").read_bytes())
    from musubi_tuner.qwen_image_cache_latents import main as cache_latents
    from musubi_tuner.qwen_image_cache_text_encoder_outputs import main as cache_text

    common = ["--dataset_config", str(toml), "--model_version", "2.1", "--device", "cpu", "--skip_existing"]
    cache_latents(common + ["--vae", str(ckpt["vae"])])
    cache_text(common + ["--text_encoder", str(ckpt["text_encoder"]), "--tokenizer", str(ckpt["tokenizer"])])
    version = VERSIONS["2.1"]
    cached = {Path(c.latent_path).name[0]: c for c in
              check_caches(collect_items(load_dataset_config(str(toml)), version), version)}
    model = v21.load_dit(ckpt["dit"], torch.float32)
    args = argparse.Namespace(weighting_scheme="none")
    g = torch.Generator().manual_seed(0)
    t, noise = torch.tensor([0.3, 0.7]), torch.randn(2, 16, 1, 4, 4, generator=g)

    def loss(names, t, noise):
        return per_sample_loss(model, load_items([cached[n] for n in names]), version, args, t, noise, "cpu",
                               torch.float32)

    with torch.no_grad():
        for pair in ("ab", "ac"):
            together = loss(pair, t, noise)
            alone = torch.cat([loss(n, t[i:i + 1], noise[i:i + 1]) for i, n in enumerate(pair)])
            assert torch.allclose(together, alone, rtol=1e-5, atol=1e-6), pair


def test_interactive_lines(tmp_path, ckpt, images, monkeypatch, capsys):
    """--interactive: each line is generated with the models loaded once; a bad line is reported, not fatal."""
    from conftest import console_input

    console_input(monkeypatch, ["a cat --w 64 --h 64 --s 2 --d 3", "x --w 48 --h 64",
                                f"a dog --ci {images[0]} --s 2 --d 4"])
    saved = run_ours(ckpt, tmp_path, "--interactive", "--output_resolution", "64")
    assert [Image.open(p).size for p in saved] == [(64, 64), (64, 64)]
    assert Image.open(saved[1]).text["control_images"] == str(images[0]) and Image.open(saved[1]).text["seed"] == "4"
    assert "multiples of 32" in capsys.readouterr().out


def test_no_kv_cache_recomputes_the_prefix(tmp_path, ckpt, monkeypatch):
    """The cache is on by default: the first step fills it and later steps read it; --no_kv_cache passes none (the
    parity tests show both give the pipeline's latents, which in fp32 on the CPU are even bit-identical)."""
    import inspect

    calls = []
    original = v21.predict_velocity

    def recording(*args, **kw):
        bound = inspect.signature(original).bind(*args, **kw)
        bound.apply_defaults()
        calls.append((bound.arguments["kv_cache"] is not None, bound.arguments["first_step"]))
        return original(*args, **kw)

    monkeypatch.setattr(v21, "predict_velocity", recording)
    common = ["--prompt", "x", "--image_size", "64", "64", "--infer_steps", "3", "--seed", "1", "--output_type", "latent"]
    run_ours(ckpt, tmp_path / "a", *common)
    assert calls == [(True, True), (True, False), (True, False)]
    calls.clear()
    run_ours(ckpt, tmp_path / "b", *common, "--no_kv_cache")
    assert [c[0] for c in calls] == [False] * 3
