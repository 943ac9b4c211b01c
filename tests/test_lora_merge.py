"""A LoRA in each supported key format changes the DiT exactly as W + m * up @ down * alpha / rank."""

import pytest
import torch
from layouts import write_single

from musubi_tuner.errors import UserError
from musubi_tuner.networks.lora_files import (
    LoraWeights, canonical_lora, linear_module_names, load_lora, merge_lora, to_diffusers, to_kohya,
)
from musubi_tuner.qwen_image import tiny
from musubi_tuner.qwen_image_generate_image import main as generate_main

TARGETS = ["transformer_blocks.0.attn.to_q", "transformer_blocks.1.img_mlp.net.0.proj", "transformer_blocks.0.txt_mod.1"]


def random_lora(model, rank=4, alpha=2.0):
    g = torch.Generator().manual_seed(0)
    mods = dict(model.named_modules())
    out = {}
    for n in TARGETS:
        w = mods[n].weight
        out[n] = LoraWeights(torch.randn(rank, w.shape[1], generator=g) * 0.1,
                             torch.randn(w.shape[0], rank, generator=g) * 0.1, alpha)
    return out


def file_in_format(lora, fmt):
    if fmt == "kohya":
        return to_kohya(lora)
    if fmt == "kohya_no_alpha":
        return {k: v for k, v in to_kohya(lora).items() if not k.endswith(".alpha")}
    if fmt == "diffusion_model":
        return to_diffusers(lora, "diffusion_model.")
    if fmt == "diffusion_model_no_alpha":
        return {k: v for k, v in to_diffusers(lora, "diffusion_model.").items() if not k.endswith(".alpha")}
    if fmt == "transformer":
        return to_diffusers(lora, "transformer.")
    raise ValueError(fmt)


@pytest.mark.parametrize("fmt", ["kohya", "kohya_no_alpha", "diffusion_model", "diffusion_model_no_alpha", "transformer"])
def test_merge_matches_formula(tmp_path, fmt):
    model = tiny.tiny_dit()
    lora = random_lora(model)
    path = write_single(file_in_format(lora, fmt), tmp_path / "lora.safetensors")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loaded = load_lora(path, linear_module_names(model))
    assert set(loaded) == set(TARGETS)
    merge_lora(model, loaded, 0.7)
    alpha_in_file = fmt in ("kohya", "diffusion_model")
    for name in TARGETS:
        w = lora[name]
        scale = (w.alpha / w.rank) if alpha_in_file or fmt == "transformer" else 1.0
        expect = before[name + ".weight"] + 0.7 * scale * (w.up @ w.down)
        assert torch.allclose(model.state_dict()[name + ".weight"], expect, atol=1e-6), name
    untouched = "transformer_blocks.1.attn.to_k.weight"
    assert torch.equal(model.state_dict()[untouched], before[untouched])


def test_bad_lora_files(tmp_path):
    model = tiny.tiny_dit()
    names = linear_module_names(model)
    with pytest.raises(UserError, match="does not exist in this DiT"):
        canonical_lora({"lora_unet_foo_bar.lora_down.weight": torch.zeros(1, 1),
                        "lora_unet_foo_bar.lora_up.weight": torch.zeros(1, 1)}, names)
    with pytest.raises(UserError, match="no LoRA weights"):
        canonical_lora({"something.weight": torch.zeros(1)}, names)
    lora = random_lora(model)
    lora["transformer_blocks.0.attn.to_q"].down = torch.zeros(4, 7)
    with pytest.raises(UserError, match="does not match"):
        merge_lora(model, lora)


def test_generation_with_lora_equals_merged_model(tmp_path, tiny_models):
    """--lora_weight changes the output exactly as a DiT file with the merged weights does."""
    model = tiny.tiny_dit()
    lora = random_lora(model, alpha=4.0)
    lora_path = write_single(to_kohya(lora), tmp_path / "lora.safetensors")
    merge_lora(model, lora, 0.8)
    merged_dit = write_single(model.state_dict(), tmp_path / "merged_dit.safetensors")

    common = ["--vae", str(tiny_models["vae"]), "--text_encoder", str(tiny_models["text_encoder"]), "--prompt", "x",
              "--image_size", "64", "64", "--infer_steps", "3", "--seed", "1", "--device", "cpu",
              "--output_type", "latent"]
    base = generate_main(["--dit", str(tiny_models["dit"]), "--save_path", str(tmp_path / "a"), *common])
    with_lora = generate_main(["--dit", str(tiny_models["dit"]), "--save_path", str(tmp_path / "b"), *common,
                               "--lora_weight", str(lora_path), "--lora_multiplier", "0.8"])
    merged = generate_main(["--dit", str(merged_dit), "--save_path", str(tmp_path / "c"), *common])
    from safetensors.torch import load_file

    a, b, c = (load_file(str(p[0]))["latent"] for p in (base, with_lora, merged))
    assert (a - b).abs().mean() > 1e-3  # the LoRA does something
    assert torch.allclose(b, c, atol=1e-5)  # and exactly what merging does


@pytest.mark.parametrize("target", ["diffusers", "transformer", "kohya"])
def test_convert_lora_script_round_trip(tmp_path, target):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from musubi_tuner.convert_lora import main as convert_main

    model = tiny.tiny_dit()
    lora = random_lora(model, alpha=2.0)
    src = tmp_path / "source.safetensors"
    save_file(to_kohya(lora), str(src), metadata={"ss_network_dim": "4"})
    out = convert_main(["--input", str(src), "--output", str(tmp_path / f"{target}.safetensors"), "--target", target])
    keys = load_file(str(out)).keys()
    prefix = {"diffusers": "diffusion_model.", "transformer": "transformer.", "kohya": "lora_unet_"}[target]
    assert all(k.startswith(prefix) for k in keys)
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ss_network_dim"] == "4"
    back = convert_main(["--input", str(out), "--output", str(tmp_path / "back.safetensors"), "--target", "kohya"])
    names = linear_module_names(model)
    a, b = load_lora(src, names), load_lora(back, names)
    for name in a:  # same delta W (the transformer format folds alpha into B)
        assert torch.allclose(a[name].up @ a[name].down * a[name].scale, b[name].up @ b[name].down * b[name].scale,
                              atol=1e-6)
