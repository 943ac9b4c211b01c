"""The nano family: the judge reads rendered ground truth, the tokenizer splits the templates as Qwen's does, the
shipped models load through the normal loaders and score above their bounds, and short LoRA runs teach them new
concepts (a judge-visible change that a wrong loss sign, timestep scale or LoRA scale would prevent)."""

import random

import pytest

from musubi_tuner.dataset.synthetic import (
    PALETTE, WORLD_SHAPES, caption, random_edit, random_layered_scene, random_scene, render, render_layers,
)
from musubi_tuner.nano.judge import matches, read


@pytest.mark.parametrize("n_shapes", [1, 2, 3])
def test_judge_reads_rendered_ground_truth(n_shapes):
    rng = random.Random(100 + n_shapes)
    scenes = [random_scene(rng, n_shapes, colours=PALETTE, shapes=WORLD_SHAPES + ("diamond",)) for _ in range(300)]
    right = sum(matches(read(render(sc)), sc) for sc in scenes)
    assert right / len(scenes) >= 0.99, right


def test_judge_fails_on_wrong_pictures():
    rng = random.Random(7)
    for _ in range(50):
        sc = random_scene(rng)
        other = random_scene(rng)
        if caption(other) != caption(sc):
            assert not matches(read(render(other)), sc)


def test_world_edits_and_layers_are_consistent():
    rng = random.Random(3)
    for kind in ("colour", "shape", "position", "background", "two_image", "enlarge"):
        sources, instruction, target = random_edit(rng, kind)
        assert instruction and matches(read(render(target)), target)
        assert all(matches(read(render(s)), s) for s in sources)
    sc = random_layered_scene(rng, 3)
    comp, layers = render_layers(sc)
    assert comp.mode == "RGBA" and len(layers) == 4 and all(layer.size == comp.size for layer in layers)


def test_nano_tokenizer_splits_templates_like_qwen():
    """Qwen's tokenizer makes 34 tokens of the text-to-image system prompt and 64 of the edit one; so does the nano
    tokenizer, so the pipelines' drop indices remove exactly the system prompt."""
    from musubi_tuner.nano.models import nano_tokenizer
    from musubi_tuner.qwen_image.text_encoder import DROP_IDX, format_prompt

    tok = nano_tokenizer()
    for template, images in (("t2i", 0), ("edit", 0), ("edit_plus", 1)):
        ids = tok(format_prompt(template, "a small blue triangle at the top on a black background", images)).input_ids
        kept = tok.convert_ids_to_tokens(ids)[DROP_IDX[template]:]
        assert kept[0] in ("a", "<|vision_start|>", "Picture"), (template, kept[:5])
        assert "Ġtriangle" in kept and "Ġbackground" in kept  # whole words


# The shipped nano models ------------------------------------------------------------------------------------------

from musubi_tuner.nano.models import SHIPPED_VERSIONS as VERSIONS  # noqa: E402


def test_shipped_files_are_complete_small_and_load_through_the_normal_loaders():
    """The DiTs are ComfyUI single files (identified from their headers as the version they are), the VAEs diffusers
    folders, the text encoder a ComfyUI single file with its tokenizer folder; 40 MB at most in all."""
    import torch

    from musubi_tuner.nano.models import WEIGHTS, shipped
    from musubi_tuner.qwen_image.dit import load_dit
    from musubi_tuner.qwen_image.model_files import expect
    from musubi_tuner.qwen_image.vae import load_vae
    from musubi_tuner.models.registry import VERSIONS as TABLE

    total = sum(f.stat().st_size for f in WEIGHTS.rglob("*") if f.is_file())
    assert total <= 40 * 2**20, total
    for version in VERSIONS:
        paths = shipped(version)
        v = TABLE[version]
        expect(paths["dit"], "--dit", "dit", v)
        model = load_dit(paths["dit"], v, torch.float32, "cpu")
        assert model.config.zero_cond_t == v.zero_cond_t
        vae = load_vae(paths["vae"], torch.float32, "cpu", v.vae_channels)
        assert vae.config.input_channels == v.vae_channels


def test_shipped_vae_folders_load_in_diffusers_with_their_own_statistics():
    """diffusers' own loader reads the trained latent statistics of config.json (a `_use_default_values` entry
    naming them made from_pretrained silently use the 20B model's instead)."""
    import json

    from diffusers import AutoencoderKLQwenImage

    from musubi_tuner.nano.models import WEIGHTS

    for name in ("vae", "vae_layered"):
        written = json.loads((WEIGHTS / name / "config.json").read_text())
        assert "_use_default_values" not in written
        vae = AutoencoderKLQwenImage.from_pretrained(str(WEIGHTS / name))
        assert list(vae.config.latents_mean) == written["latents_mean"]
        assert list(vae.config.latents_std) == written["latents_std"]
        assert list(vae.config.latents_mean) != list(AutoencoderKLQwenImage().config.latents_mean)


# scores of the shipped files (build_info.json) and the bounds these few seeds must reach
SHIPPED_BOUNDS = {"original": 0.6, "layered": 0.7, "edit-2509": 0.5, "edit-2511": 0.5}


@pytest.mark.parametrize("version", VERSIONS)
def test_shipped_models_score_above_their_bounds(version):
    """The shipped DiTs, loaded through the normal loaders, do what they were trained for on held-out prompts the
    judge scores (text to image: colour and shape right; edit: the edited attribute right and the others kept)."""
    from musubi_tuner.nano.build import heldout_captions, score_version
    from musubi_tuner.nano.models import shipped

    score = score_version(version, shipped(version), 24, heldout_captions(0) if version == "original" else None)
    print(version, score.as_dict())
    assert score.main >= SHIPPED_BOUNDS[version], score.as_dict()


def test_quick_build_makes_every_file_and_resumes(tmp_path):
    """`python -m musubi_tuner.nano build --quick`: every stage runs with the real caching and training scripts (edit
    continues from text to image, 2511 from 2509); a second run finds every stage built and rebuilds nothing."""
    from musubi_tuner.nano.build import STAGES, Plan, build

    info = build(tmp_path, Plan.quick())
    assert set(info["seconds"]) == set(STAGES)
    files = [tmp_path / f"nano_qwen_image_{v}.safetensors" for v in ("original", "edit-2509", "edit-2511", "layered")]
    files += [tmp_path / "vae" / "config.json", tmp_path / "vae_layered" / "config.json",
              tmp_path / "text_encoder" / "nano_qwen_2.5_vl.safetensors"]
    stamps = {f: f.stat().st_mtime_ns for f in files}
    assert "_use_default_values" not in (tmp_path / "vae" / "config.json").read_text()
    build(tmp_path, Plan.quick())
    assert {f: f.stat().st_mtime_ns for f in files} == stamps


def test_shipped_build_info_matches_the_default_plan():
    """Every shipped file was built with the settings the default plan gives (its parents' steps included), so
    `python -m musubi_tuner.nano build` reproduces what ships."""
    import json

    from musubi_tuner.nano.build import STAGES, Plan, stage_settings
    from musubi_tuner.nano.models import WEIGHTS

    info = json.loads((WEIGHTS / "build_info.json").read_text())
    assert set(info["settings"]) == set(STAGES)
    assert all(info["settings"][s] == stage_settings(s, Plan()) for s in STAGES)


def test_scripts_use_the_settings_the_nano_files_recommend(tmp_path, caplog):
    """The nano DiTs carry CFG 1, 20 steps, 64x64 and native control sizing in their metadata: generation without
    those options uses them (and gives no advice to resize Edit-2511 controls to 1M pixels); options given win."""
    import logging

    from PIL import Image

    from musubi_tuner.nano.models import NANO_RECOMMENDED, shipped
    from musubi_tuner.generation import recommended
    from musubi_tuner.qwen_image_generate_image import main as generate_main

    for version in VERSIONS:
        assert recommended.read(shipped(version)["dit"]) == NANO_RECOMMENDED

    def args(version, *extra):
        p = shipped(version)
        return ["--dit", str(p["dit"]), "--vae", str(p["vae"]), "--text_encoder", str(p["text_encoder"]),
                "--tokenizer", str(p["tokenizer"]), "--model_version", version, "--device", "cpu", "--seed", "1",
                "--infer_steps", "2", *extra]

    out = generate_main(args("original", "--prompt", "a red circle", "--save_path", str(tmp_path / "a")))
    info = Image.open(out[0])
    assert info.size == (64, 64) and info.text["guidance_scale"] == "1.0" and info.text["infer_steps"] == "2"
    out = generate_main(args("original", "--prompt", "a red circle", "--guidance_scale", "3", "--save_path",
                             str(tmp_path / "b")))
    assert Image.open(out[0]).text["guidance_scale"] == "3.0"
    ctrl = tmp_path / "c.png"
    Image.new("RGB", (64, 64), "white").save(ctrl)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        out = generate_main(args("edit-2511", "--prompt", "make it blue", "--control_image_path", str(ctrl),
                                 "--save_path", str(tmp_path / "e")))
    assert Image.open(out[0]).size == (64, 64) and "resize_control_to_official_size" not in caplog.text
    assert "recommends" in caplog.text
    out = generate_main(args("layered", "--prompt", "two shapes", "--control_image_path", str(ctrl), "--output_layers",
                             "2", "--save_path", str(tmp_path / "l")))
    assert all(Image.open(p).size == (64, 64) for p in out) and len(out) == 3


def test_training_samples_use_the_recommended_guidance(tmp_path):
    from PIL import Image

    from musubi_tuner.dataset.synthetic import write_shapes_dataset
    from musubi_tuner.nano.models import shipped
    from musubi_tuner.qwen_image_cache_latents import main as cache_latents
    from musubi_tuner.qwen_image_cache_text_encoder_outputs import main as cache_text
    from musubi_tuner.qwen_image_train_network import main as train_main

    p = shipped("original")
    img = write_shapes_dataset(tmp_path / "data", n=2, size=(64, 64))
    toml = tmp_path / "d.toml"
    toml.write_text(f'[general]\nresolution = 64\n[[datasets]]\nimage_directory = "{img}"\n'
                    f'cache_directory = "{tmp_path / "cache"}"\n')
    common = ["--dataset_config", str(toml), "--device", "cpu"]
    cache_latents(common + ["--vae", str(p["vae"])])
    cache_text(common + ["--text_encoder", str(p["text_encoder"]), "--tokenizer", str(p["tokenizer"])])
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle --d 1 --s 2\n")
    r = train_main(common + ["--dit", str(p["dit"]), "--vae", str(p["vae"]), "--text_encoder", str(p["text_encoder"]),
                             "--tokenizer", str(p["tokenizer"]), "--output_dir", str(tmp_path / "o"),
                             "--max_train_steps", "1", "--sample_prompts", str(prompts), "--sample_every_n_steps", "1",
                             "--max_data_loader_n_workers", "0"])
    sample, = r["sample_dir"].glob("*.png")
    assert Image.open(sample).text["guidance_scale"] == "1.0" and Image.open(sample).size == (64, 64)
