"""Edit / Edit-2509 / Edit-2511 / Layered generation equal diffusers' pipelines; inpainting mask and RCM."""

import numpy as np
import pytest
import torch
from diffusers import (FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImageEditPlusPipeline,
                       QwenImageLayeredPipeline)
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from test_generate import QWEN_IMAGE_SCHEDULER

from musubi_tuner.qwen_image import tiny
from musubi_tuner.qwen_image.tiny import write_tiny_models
from musubi_tuner.models.registry import VERSIONS
from musubi_tuner.qwen_image_generate_image import main as generate_main

PIPELINES = {"edit": QwenImageEditPipeline, "edit-2509": QwenImageEditPlusPipeline,
             "edit-2511": QwenImageEditPlusPipeline, "layered": QwenImageLayeredPipeline}


@pytest.fixture(autouse=True)
def small_areas(monkeypatch):
    """The pipelines size images to fixed pixel areas (1024^2 for the VAE, 384^2 for the VL model, 640^2 layered);
    both sides use smaller areas here, through the same code paths, to keep the CPU tests fast."""
    from diffusers.pipelines.qwenimage import (pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus,
                                               pipeline_qwenimage_layered)

    from musubi_tuner.qwen_image import edit, text_encoder

    area = {1024 * 1024: 128 * 128, 384 * 384: 64 * 64, 640 * 640: 96 * 96}
    for mod in (pipeline_qwenimage_edit, pipeline_qwenimage_edit_plus, pipeline_qwenimage_layered):
        real = mod.calculate_dimensions
        monkeypatch.setattr(mod, "calculate_dimensions", lambda a, r, real=real: real(area.get(a, a), r))
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "CONDITION_IMAGE_SIZE", 64 * 64)
    monkeypatch.setattr(pipeline_qwenimage_edit_plus, "VAE_IMAGE_SIZE", 128 * 128)
    monkeypatch.setattr(edit, "OFFICIAL_AREA", 128 * 128)
    monkeypatch.setattr(edit, "LAYERED_AREA", 96 * 96)
    monkeypatch.setattr(text_encoder, "VL_AREA", {"edit": 128 * 128, "edit_plus": 64 * 64})


@pytest.fixture(scope="module")
def model_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("edit_models")
    return {v: write_tiny_models(root / v, VERSIONS[v]) for v in PIPELINES}


def reference(version, models):
    """The diffusers pipeline with transformers' own Qwen2VLProcessor, loaded from the model folder (whose image
    processor settings are not the defaults): nothing of ours in the reference."""
    from transformers import AutoProcessor

    tok = tiny.tiny_tokenizer()
    v = VERSIONS[version]
    kw = dict(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER), vae=tiny.tiny_vae(v.vae_channels),
              text_encoder=tiny.tiny_text_encoder(tok), tokenizer=tok, transformer=tiny.tiny_dit(v))
    kw["processor"] = AutoProcessor.from_pretrained(models["tokenizer"])
    assert kw["processor"].image_processor.size["longest_edge"] == tiny.TINY_IMAGE_PROCESSOR["size"]["longest_edge"]
    forward_token_types(kw["text_encoder"], kw["processor"])
    return PIPELINES[version](**kw)


def forward_token_types(text_encoder, processor):
    """diffusers 0.42's edit pipelines call the text encoder without the processor's mm_token_type_ids, which
    transformers 5 needs to place image tokens on Qwen2.5-VL's 3D RoPE grid (diffusers issue #14194, fix in PR
    #14189): the prompt embeddings then differ from those the models were trained with (transformers 4). The
    reference gets that fix: the token types from transformers' own processor, as the processor returns them."""
    import functools

    real = text_encoder.forward

    @functools.wraps(real)  # generate() reads the signature
    def forward(*a, input_ids=None, **kw):
        if input_ids is not None and kw.get("image_grid_thw") is not None and kw.get("mm_token_type_ids") is None:
            kw["mm_token_type_ids"] = torch.tensor(processor.create_mm_token_type_ids(input_ids), dtype=torch.long)
        return real(*a, input_ids=input_ids, **kw)

    text_encoder.forward = forward


def picture(path, size, colour, rgba=False):
    im = Image.new("RGBA" if rgba else "RGB", size, (255, 255, 255, 255) if rgba else (240, 240, 240))
    d = ImageDraw.Draw(im)
    d.ellipse((size[0] // 5, size[1] // 5, size[0] * 3 // 4, size[1] * 4 // 5), fill=colour)
    d.rectangle((0, 0, size[0] // 6, size[1] // 6), fill=(20, 20, 200) + ((255,) if rgba else ()))
    im.save(path)
    return im


def ours(models, version, out, controls, *extra):
    return generate_main([
        "--dit", str(models["dit"]), "--vae", str(models["vae"]), "--text_encoder", str(models["text_encoder"]),
        "--model_version", version, "--save_path", str(out), "--device", "cpu", "--control_image_path",
        *[str(c) for c in controls], *extra])


def as_float(path):
    return np.asarray(Image.open(path), dtype=np.float32) / 255.0


@pytest.mark.parametrize("version,sizes", [
    ("edit", [(80, 48)]),
    ("edit-2509", [(80, 48), (48, 64)]),
    ("edit-2509", [(64, 64), (96, 48), (40, 72)]),
    ("edit-2511", [(72, 56), (56, 72)]),
])
def test_edit_parity_with_diffusers(tmp_path, model_sets, version, sizes):
    imgs = [picture(tmp_path / f"c{i}.png", s, (200, 40 * i, 40)) for i, s in enumerate(sizes)]
    h, w, steps, seed = 64, 96, 4, 11
    pipe = reference(version, model_sets[version])
    ref = pipe(image=imgs[0] if version == "edit" else imgs, prompt="make it blue", negative_prompt="ugly",
               true_cfg_scale=3.0, height=h, width=w, num_inference_steps=steps,
               generator=torch.Generator("cpu").manual_seed(seed), output_type="np").images[0]
    saved = ours(model_sets[version], version, tmp_path / "out", [tmp_path / f"c{i}.png" for i in range(len(sizes))],
                 "--prompt", "make it blue", "--negative_prompt", "ugly", "--guidance_scale", "3.0", "--image_size",
                 str(h), str(w), "--infer_steps", str(steps), "--seed", str(seed), "--resize_control_to_official_size",
                 "--append_original_name")
    assert saved[0].name.endswith(f"_{seed}_c0.png")
    diff = np.abs(as_float(saved[0]) - ref).mean()
    print(f"{version} with {len(sizes)} control(s): mean |diff| = {diff:.5f}")
    assert diff < 0.01


@pytest.mark.parametrize("version,sizes", [("edit", [(128, 96)]), ("edit-2511", [(64, 64), (96, 32)])])
def test_edit_prompt_embeddings_equal_the_pipeline_with_transformers_processor(tmp_path, model_sets, version, sizes):
    """The text encoding of an edit prompt with its images equals the pipeline's own encode_prompt, whose processor is
    transformers' Qwen2VLProcessor loaded from the model folder (image processor settings that are not the
    defaults): ours must read the same settings from the folder (processor_config.json, nested image_processor)."""
    from musubi_tuner.qwen_image.text_encoder import encode_prompts, load_processor, load_text_encoder, load_tokenizer

    models = model_sets[version]
    # sizes already at the VL area in multiples of 32, so neither side resizes before the processor
    imgs = [picture(tmp_path / f"c{i}.png", s, (200, 60 * i, 40)) for i, s in enumerate(sizes)]
    pipe = reference(version, models)
    ref, ref_mask = pipe.encode_prompt("make it blue", image=imgs[0] if version == "edit" else imgs, device="cpu")
    te = load_text_encoder(models["text_encoder"], torch.float32)
    proc = load_processor(load_tokenizer(None, str(models["text_encoder"])), None, str(models["text_encoder"]))
    monkey_area = {"edit": 128 * 96, "edit_plus": 64 * 64}
    from musubi_tuner.qwen_image import text_encoder as te_mod

    te_mod.VL_AREA.update(monkey_area)
    ours_emb = encode_prompts(te, proc, ["make it blue"], VERSIONS[version].template, "cpu", [imgs])[0]
    n = ref.shape[1] if ref_mask is None else int(ref_mask[0].sum())
    assert ours_emb.shape == (n, ref.shape[-1])
    err = (ours_emb - ref[0, :n].detach()).abs().max().item()
    print(f"{version}: max |diff| of the prompt embeddings = {err:.2e}")
    assert err < 1e-4
    # the image tokens' 3D positions matter: the pipeline without the token types (diffusers#14194) differs
    pipe.text_encoder.forward = type(pipe.text_encoder).forward.__get__(pipe.text_encoder)
    unfixed, _ = pipe.encode_prompt("make it blue", image=imgs[0] if version == "edit" else imgs, device="cpu")
    assert (ours_emb - unfixed[0, :n]).abs().max().item() > 1e-3


def test_layered_parity_with_diffusers(tmp_path, model_sets):
    src = picture(tmp_path / "rgba.png", (80, 64), (200, 30, 30, 255), rgba=True)
    layers, steps, seed = 3, 4, 5
    pipe = reference("layered", model_sets["layered"])
    ref = pipe(image=src, prompt="a red ball", negative_prompt=" ", true_cfg_scale=2.5, layers=layers,
               num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
               resolution=640).images[0]
    saved = ours(model_sets["layered"], "layered", tmp_path / "out", [tmp_path / "rgba.png"], "--prompt", "a red ball",
                 "--negative_prompt", " ", "--guidance_scale", "2.5", "--output_layers", str(layers), "--infer_steps",
                 str(steps), "--seed", str(seed))
    assert [p.name.split("_")[-1] for p in saved] == ["composite.png"] + [f"layer{i}.png" for i in range(1, layers + 1)]
    assert all(Image.open(p).mode == "RGBA" for p in saved)
    assert len(ref) == layers  # the pipeline drops the composite frame 0
    for i in range(layers):
        got = as_float(saved[i + 1])
        assert got.shape == ref[i].shape and got.shape[2] == 4
        diff = np.abs(got - ref[i]).mean()
        print(f"layered layer {i + 1}: mean |diff| = {diff:.5f}")
        assert diff < 0.01


def test_inpainting_keeps_black_region(tmp_path, model_sets):
    from musubi_tuner.dataset.buckets import to_tensor
    from musubi_tuner.qwen_image.vae import decode, encode, load_vae

    m = model_sets["edit-2509"]
    control = picture(tmp_path / "c.png", (192, 64), (200, 40, 40))
    mask = Image.new("L", (192, 64), 0)
    ImageDraw.Draw(mask).rectangle((96, 0, 191, 63), fill=255)  # right half changes
    mask.save(tmp_path / "mask.png")
    saved = ours(m, "edit-2509", tmp_path / "out", [tmp_path / "c.png"], "--prompt", "x", "--image_size", "64", "192",
                 "--infer_steps", "4", "--seed", "1", "--mask_path", str(tmp_path / "mask.png"), "--output_type",
                 "latent_images")
    vae = load_vae(m["vae"], torch.float32)
    roundtrip = decode(vae, encode(vae, to_tensor(control).unsqueeze(0)))[0, :, 0]
    control_px = ((roundtrip.permute(1, 2, 0).numpy() + 1) / 2)
    out = as_float([p for p in saved if p.suffix == ".png"][0])
    keep = np.abs(out[:, :48] - control_px[:, :48]).mean()  # away from the boundary (decoder receptive field)
    change = np.abs(out[:, 96:] - control_px[:, 96:]).mean()
    print(f"inpainting: keep region |diff| {keep:.4f}, change region |diff| {change:.4f}")
    assert keep < 0.02 and change > 5 * keep
    lat = load_file(str([p for p in saved if p.suffix == ".safetensors"][0]))["latent"]
    ctrl_lat = encode(vae, to_tensor(control).unsqueeze(0))[0]
    assert torch.allclose(lat[:, :, :, :12], ctrl_lat[:, :, :, :12], atol=1e-5)  # kept tokens are exactly the control


def test_rcm_thresholds_and_debug_masks(tmp_path, model_sets):
    from musubi_tuner.dataset.buckets import to_tensor
    from musubi_tuner.qwen_image.vae import encode, load_vae

    m = model_sets["edit"]
    control = picture(tmp_path / "c.png", (64, 64), (30, 200, 30))
    common = ["--prompt", "x", "--image_size", "64", "64", "--infer_steps", "5", "--seed", "3", "--output_type",
              "latent", "--guidance_scale", "1.0"]
    plain = load_file(str(ours(m, "edit", tmp_path / "a", [tmp_path / "c.png"], *common)[0]))["latent"]
    zero = load_file(str(ours(m, "edit", tmp_path / "b", [tmp_path / "c.png"], *common, "--rcm_threshold", "0")[0]))
    assert torch.allclose(zero["latent"], plain, atol=1e-6)  # threshold 0: nothing preserved
    huge = ours(m, "edit", tmp_path / "c", [tmp_path / "c.png"], *common, "--rcm_threshold", "1e9", "--rcm_debug_save",
                "--rcm_kernel_size", "3", "--rcm_dilate_size", "1")
    vae = load_vae(m["vae"], torch.float32)
    ctrl = encode(vae, to_tensor(control).unsqueeze(0))[0]
    assert torch.allclose(load_file(str(huge[0]))["latent"], ctrl, atol=1e-5)  # everything follows the control path
    masks = sorted((tmp_path / "c").glob("*_rcm_step*.png"))
    assert len(masks) == 5 and Image.open(masks[0]).size == (8, 8)
    rel = ours(m, "edit", tmp_path / "d", [tmp_path / "c.png"], *common, "--rcm_threshold", "0.9",
               "--rcm_relative_threshold")
    mid = load_file(str(rel[0]))["latent"]
    assert not torch.allclose(mid, plain) and not torch.allclose(mid, ctrl)


@pytest.mark.parametrize("extra,message", [
    (["--resize_control_to_official_size", "--resize_control_to_image_size"], "mutually exclusive"),
    (["--rcm_threshold", "0.1", "--mask_path", "{mask}"], "cannot be used together"),
    (["--rcm_threshold", "0.1", "--image_size", "64", "96"], "first control image at the output size"),
    (["--mask_path", "{tmp}/nope.png"], "nope.png is not a file"),
])
def test_bad_edit_input(tmp_path, capsys, model_sets, extra, message):
    picture(tmp_path / "c.png", (64, 64), (1, 2, 3))
    Image.new("L", (64, 64)).save(tmp_path / "mask.png")
    extra = [e.format(mask=tmp_path / "mask.png", tmp=tmp_path) for e in extra]
    with pytest.raises(SystemExit) as e:
        ours(model_sets["edit-2509"], "edit-2509", tmp_path / "out", [tmp_path / "c.png"], "--prompt", "x", *extra)
    assert e.value.code == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "out").exists()


def test_mask_without_control_and_unreadable_image(tmp_path, capsys, model_sets):
    Image.new("L", (64, 64)).save(tmp_path / "mask.png")
    m = model_sets["edit"]
    with pytest.raises(SystemExit):
        generate_main(["--dit", str(m["dit"]), "--vae", str(m["vae"]), "--text_encoder", str(m["text_encoder"]),
                       "--save_path", str(tmp_path / "o"), "--prompt", "x", "--mask_path", str(tmp_path / "mask.png"),
                       "--image_size", "64", "64", "--device", "cpu"])
    assert "work only with an edit" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate_main(["--dit", str(m["dit"]), "--vae", str(m["vae"]), "--text_encoder", str(m["text_encoder"]),
                       "--model_version", "edit", "--save_path", str(tmp_path / "o"), "--prompt", "x",
                       "--mask_path", str(tmp_path / "mask.png"), "--device", "cpu"])
    assert "needs a control image" in capsys.readouterr().err
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(SystemExit):
        ours(m, "edit", tmp_path / "o", [tmp_path / "bad.png"], "--prompt", "x")
    err = capsys.readouterr().err
    assert "cannot read image" in err and "bad.png" in err
    assert not (tmp_path / "o").exists()
