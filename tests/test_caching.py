"""Caching end to end on the tiny VAE / text encoder for original, edit-2509 and layered."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from musubi_tuner.dataset.config import load_dataset_config
from musubi_tuner.dataset.items import collect_items
from musubi_tuner.dataset.prepare import prepare_item
from musubi_tuner.dataset.synthetic import write_shapes_dataset
from musubi_tuner.errors import UserError
from musubi_tuner.qwen_image import vae as vae_mod
from musubi_tuner.qwen_image.text_encoder import encode_prompts, load_processor, load_text_encoder, load_tokenizer
from musubi_tuner.qwen_image.tiny import write_tiny_models
from musubi_tuner.models.registry import VERSIONS
from musubi_tuner.qwen_image_cache_latents import main as cache_latents_main
from musubi_tuner.qwen_image_cache_text_encoder_outputs import main as cache_te_main


def run_both(models, toml, *extra, version="original"):
    lat = cache_latents_main(["--dataset_config", str(toml), "--vae", str(models["vae"]), "--model_version", version,
                              "--device", "cpu", *extra])
    te = cache_te_main(["--dataset_config", str(toml), "--text_encoder", str(models["text_encoder"]),
                        "--model_version", version, "--device", "cpu", *extra])
    return lat, te


def direct_text(models, caption, template, images=None):
    te = load_text_encoder(models["text_encoder"], torch.float32)
    proc = load_processor(load_tokenizer(None, str(models["text_encoder"])), None, str(models["text_encoder"]))
    return encode_prompts(te, proc, [caption], template, "cpu", [images] if images else None)[0]


def test_original_end_to_end(tmp_path, tiny_models, monkeypatch):
    img = write_shapes_dataset(tmp_path / "imgs", n=3, size=(96, 64))
    cache = tmp_path / "cache"
    toml = tmp_path / "d.toml"
    toml.write_text(f'[general]\nresolution = 64\nenable_bucket = true\n[[datasets]]\nimage_directory = "{img}"\n'
                    f'cache_directory = "{cache}"\n')
    lat, te = run_both(tiny_models, toml, "--batch_size", "2")
    assert lat["cached"] == 3 and te["cached"] == 3
    files = sorted(p.name for p in cache.iterdir())
    assert files == sorted([f"img00{i}_0096x0064_qi.safetensors" for i in range(3)] +  # original size, as musubi
                           [f"img00{i}_qi_te.safetensors" for i in range(3)])
    # latents equal a direct encode of the prepared pixels
    item = collect_items(load_dataset_config(toml), VERSIONS["original"])[1]
    vae = vae_mod.load_vae(tiny_models["vae"], torch.float32)
    want = vae_mod.encode(vae, prepare_item(item, VERSIONS["original"]).targets.unsqueeze(0)[:, :, 0])[0]
    got = load_file(str(cache / "img001_0096x0064_qi.safetensors"))["latents_1x6x10_float32"]  # musubi's keys
    assert got.shape == (16, 1, 6, 10) and torch.allclose(got, want, atol=1e-5)
    # embeddings equal a direct encode with the T2I template
    emb = load_file(str(cache / "img001_qi_te.safetensors"))["varlen_vl_embed_bfloat16"]  # musubi-tuner's dtype
    # equal up to bf16's rounding (relative 2^-9; the batched encode differs from a single one by < 1e-5 before it)
    assert torch.allclose(emb.float(), direct_text(tiny_models, item.caption, "t2i"), rtol=2 ** -8, atol=1e-5)
    with safe_open(str(cache / "img001_qi_te.safetensors"), "pt") as f:
        md = f.metadata()
        assert md["model_version"] == "original" and md["template"] == "t2i"
        assert md["architecture"] == "qwen_image" and md["caption1"] == item.caption and md["format_version"] == "1.0.1"

    # second run with --skip_existing: no model is even loaded
    def boom(*a, **k):
        raise AssertionError("model loaded although every cache is fresh")

    monkeypatch.setattr(vae_mod, "load_vae", boom)
    import musubi_tuner.qwen_image.text_encoder as te_mod

    real_load_te = te_mod.load_text_encoder
    monkeypatch.setattr(te_mod, "load_text_encoder", boom)
    lat, te = run_both(tiny_models, toml, "--skip_existing")
    assert lat == {"cached": 0, "skipped": 3, "foreign": 0, "removed": 0} and te["skipped"] == 3
    monkeypatch.setattr(te_mod, "load_text_encoder", real_load_te)
    monkeypatch.undo()

    # a changed image and a changed caption are re-cached; a removed item's caches are removed
    before = load_file(str(cache / "img000_0096x0064_qi.safetensors"))["latents_1x6x10_float32"]
    write_shapes_dataset(tmp_path / "other", n=1, size=(96, 64), seed=9, colours=["blue"])
    (tmp_path / "other" / "img000.png").replace(img / "img000.png")
    (img / "img002.txt").write_text("a completely different caption")
    (img / "img001.png").unlink()
    (img / "img001.txt").unlink()
    lat, te = run_both(tiny_models, toml, "--skip_existing")
    assert lat["cached"] == 1 and te["cached"] == 1 and lat["removed"] == 1 and te["removed"] == 1
    assert not torch.equal(before, load_file(str(cache / "img000_0096x0064_qi.safetensors"))["latents_1x6x10_float32"])
    assert not (cache / "img001_qi_te.safetensors").exists()


def test_keep_cache_keeps_orphans(tmp_path, tiny_models):
    img = write_shapes_dataset(tmp_path / "imgs", n=2, size=(64, 64))
    toml = tmp_path / "d.toml"
    toml.write_text(f'[[datasets]]\nimage_directory = "{img}"\nresolution = 64\n')
    run_both(tiny_models, toml)
    (img / "img001.png").unlink()
    lat, _ = run_both(tiny_models, toml, "--keep_cache")
    assert lat["removed"] == 0 and (img / "img001_0064x0064_qi.safetensors").exists()


def test_edit_2509_two_controls_of_different_sizes(tmp_path):
    models = write_tiny_models(tmp_path / "m", VERSIONS["edit-2509"])
    img = write_shapes_dataset(tmp_path / "imgs", n=2, size=(64, 64), controls=2)
    toml = tmp_path / "d.toml"
    toml.write_text(f'[[datasets]]\nimage_directory = "{img}"\ncontrol_directory = "{tmp_path / "imgs_control"}"\n'
                    f'resolution = 64\ncontrol_resolution = [64, 64]\n')
    lat, te = run_both(models, toml, version="edit-2509")
    assert lat["cached"] == 2 and te["cached"] == 2
    sd = load_file(str(img / "img000_0064x0064_qie.safetensors"))
    assert sd["latents_1x8x8_float32"].shape == (16, 1, 8, 8)
    assert sd["latents_control_0_1x8x8_float32"].shape == (16, 1, 8, 8)
    assert [k for k in sd if k.startswith("latents_control_1_")] != ["latents_control_1_1x8x8_float32"]  # 48x64
    item = collect_items(load_dataset_config(toml), VERSIONS["edit-2509"])[0]
    prep = prepare_item(item, VERSIONS["edit-2509"], with_targets=False)
    assert prep.control_images[0].size != prep.control_images[1].size
    emb = load_file(str(img / "img000_qie_te.safetensors"))["varlen_vl_embed_bfloat16"]
    want = direct_text(models, item.caption, "edit_plus", prep.control_images)
    assert emb.shape == want.shape and torch.allclose(emb.float(), want, rtol=2 ** -8, atol=1e-5)
    plain = direct_text(models, item.caption, "t2i")
    assert emb.shape != plain.shape  # the images really went through the VL model


def test_layered_composite_and_three_layers(tmp_path):
    models = write_tiny_models(tmp_path / "m", VERSIONS["layered"])
    img = write_shapes_dataset(tmp_path / "imgs", n=2, size=(64, 64), layers=3)
    toml = tmp_path / "d.toml"
    toml.write_text(f'[[datasets]]\nimage_directory = "{img}"\nresolution = 64\nmultiple_target = true\n')
    lat, te = run_both(models, toml, version="layered")
    assert lat["cached"] == 2
    got = load_file(str(img / "img000_0064x0064_qil.safetensors"))["latents_4x8x8_float32"]
    assert got.shape == (16, 4, 8, 8)
    item = collect_items(load_dataset_config(toml), VERSIONS["layered"])[0]
    prep = prepare_item(item, VERSIONS["layered"])
    assert prep.targets.shape == (4, 4, 64, 64)  # RGBA, composite + 3 layers
    vae = vae_mod.load_vae(models["vae"], torch.float32, expected_channels=4)
    layer2 = vae_mod.encode(vae, prep.targets[:, 2].unsqueeze(0))[0, :, 0]
    assert torch.allclose(got[:, 2], layer2, atol=1e-5)


def test_corrupt_image_is_one_error_and_no_partial_file(tmp_path, tiny_models, capsys):
    img = write_shapes_dataset(tmp_path / "imgs", n=2, size=(64, 64))
    (img / "img001.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    toml = tmp_path / "d.toml"
    toml.write_text(f'[[datasets]]\nimage_directory = "{img}"\nresolution = 64\n')
    with pytest.raises(SystemExit) as e:
        cache_latents_main(["--dataset_config", str(toml), "--vae", str(tiny_models["vae"]), "--device", "cpu"])
    assert e.value.code == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "img001.png" in err[0]
    assert not list(img.glob("img001*.safetensors")) and not list(img.glob(".*tmp"))
    with pytest.raises(UserError, match="not found"):
        load_dataset_config(tmp_path / "missing.toml")
