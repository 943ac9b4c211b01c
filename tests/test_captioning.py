"""Qwen-Image-Layered without a prompt: the image is captioned by the text encoder exactly as diffusers'
QwenImageLayeredPipeline does (prompt=None), in both languages; prompt-file lines without text; training samples
caption once."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_edit_layered import as_float, ours, picture, reference, small_areas  # noqa: F401 (fixture)
from transformers import GenerationConfig, Qwen2_5_VLForConditionalGeneration

from musubi_tuner.fileio import save_safetensors
from musubi_tuner.qwen_image import captioning, tiny
from musubi_tuner.qwen_image.text_encoder import to_comfy_key
from musubi_tuner.qwen_image.tiny import write_tiny_models
from musubi_tuner.models.registry import VERSIONS

# Qwen2.5-VL-Instruct's generation_config.json, with the tiny tokenizer's ids
QWEN_GENERATION = dict(do_sample=True, top_k=1, top_p=0.001, temperature=0.1, repetition_penalty=1.05)


@pytest.fixture(scope="module")
def layered_models(tmp_path_factory):
    """The tiny layered set, with a text-encoder file that keeps its lm_head (captioning needs it) and Qwen's
    generation_config.json beside it."""
    models = write_tiny_models(tmp_path_factory.mktemp("layered"), VERSIONS["layered"])
    tok = tiny.tiny_tokenizer()
    te = tiny.tiny_text_encoder(tok)
    full = models["tokenizer"] / "tiny_qwen_2.5_vl_with_head.safetensors"
    save_safetensors({to_comfy_key(k): v for k, v in te.state_dict().items()}, full)
    end = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    GenerationConfig(**QWEN_GENERATION, eos_token_id=end, pad_token_id=end[1],
                     bos_token_id=end[1]).save_pretrained(models["tokenizer"])
    return {**models, "comfy_text_encoder": models["text_encoder"], "text_encoder": full}


@pytest.fixture
def recorded_generations(monkeypatch):
    """Every Qwen2.5-VL generate() call's new token ids, on either side."""
    calls = []
    real = Qwen2_5_VLForConditionalGeneration.generate

    def generate(self, *a, **kw):
        out = real(self, *a, **kw)
        calls.append(out[0, kw["input_ids"].shape[1]:].tolist())
        return out

    monkeypatch.setattr(Qwen2_5_VLForConditionalGeneration, "generate", generate)
    return calls


def test_annotator_prompts_are_the_pipelines(layered_models):
    pipe = reference("layered", layered_models)
    assert captioning.CAPTION_PROMPTS["en"] == pipe.image_caption_prompt_en
    assert captioning.CAPTION_PROMPTS["cn"] == pipe.image_caption_prompt_cn


@pytest.mark.parametrize("lang,option", [("en", ["--automatic_prompt_lang_for_layered", "en"]), ("cn", []),
                                         ("cn", ["--automatic_prompt_lang_for_layered", "zh"])])
def test_caption_and_layers_equal_the_pipeline_without_prompt(tmp_path, layered_models, recorded_generations, lang,
                                                              option, capsys):
    src = picture(tmp_path / "rgba.png", (80, 64), (30, 160, 40, 255), rgba=True)
    layers, steps, seed = 2, 3, 11
    pipe = reference("layered", layered_models)
    pipe.text_encoder.generation_config = GenerationConfig.from_pretrained(layered_models["tokenizer"])
    ref_caption = pipe.get_image_caption  # the reference's own captioner, recorded to compare with ours
    captions = []
    pipe.get_image_caption = lambda *a, **kw: captions.append(ref_caption(*a, **kw)) or captions[-1]
    ref = pipe(image=src, prompt=None, negative_prompt=" ", true_cfg_scale=2.0, layers=layers,
               num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
               resolution=640, use_en_prompt=lang == "en",
               max_sequence_length=1024).images[0]  # the captions are long; ours keeps 1024 tokens (FACTS.md)
    saved = ours(layered_models, "layered", tmp_path / "out", [tmp_path / "rgba.png"], "--negative_prompt", " ",
                 "--guidance_scale", "2.0", "--output_layers", str(layers), "--infer_steps", str(steps), "--seed",
                 str(seed), *option)
    assert len(recorded_generations) == 2
    ref_ids, our_ids = recorded_generations
    print(f"{lang}: {len(ref_ids)} new tokens, caption {captions[0][:60]!r}")
    assert our_ids == ref_ids and len(our_ids) > 1
    out = capsys.readouterr().out
    assert f"automatic caption ({lang})" in out and captions[0] in out
    png = Image.open(saved[0])
    assert png.text["prompt"] == captions[0] and png.text["automatic_caption"] == lang
    for i in range(layers):
        diff = np.abs(as_float(saved[i + 1]) - ref[i]).mean()
        assert diff < 0.01, f"layer {i + 1}: mean |diff| {diff}"


def test_single_file_without_generation_config_decodes_greedily_as_qwen(tmp_path, layered_models):
    """A text encoder without generation_config.json (a single file elsewhere) gets Qwen's settings: the same tokens
    as the file's top_k=1 sampling."""
    from musubi_tuner.qwen_image.text_encoder import load_processor, load_text_encoder, load_tokenizer

    lone = tmp_path / "te"
    lone.mkdir()
    (lone / "te.safetensors").write_bytes(layered_models["text_encoder"].read_bytes())
    (lone / "config.json").write_text((layered_models["tokenizer"] / "config.json").read_text())
    image = Image.new("RGBA", (64, 48), (200, 40, 40, 255))
    texts = []
    for path in (layered_models["text_encoder"], lone / "te.safetensors"):
        te = load_text_encoder(path, torch.float32, "cpu")
        proc = load_processor(load_tokenizer(str(layered_models["tokenizer"])), str(layered_models["tokenizer"]))
        texts.append(captioning.caption_image(te, proc, image, "en", max_new_tokens=40))
    assert texts[0] == texts[1] and texts[0]


@pytest.mark.parametrize("memory", [[], ["--fp8_vl", "--text_encoder_cpu"]])
def test_prompt_file_line_without_text(tmp_path, layered_models, recorded_generations, memory):
    picture(tmp_path / "a.png", (64, 64), (30, 30, 200, 255), rgba=True)
    lines = tmp_path / "prompts.txt"
    lines.write_text(f"--ci {tmp_path / 'a.png'} --s 2 --d 3 --l 1\nwith text --ci {tmp_path / 'a.png'} "
                     f"--s 2 --d 3 --l 1\n")
    from musubi_tuner.qwen_image_generate_image import main as generate_main

    saved = generate_main(["--dit", str(layered_models["dit"]), "--vae", str(layered_models["vae"]), "--text_encoder",
                           str(layered_models["text_encoder"]), "--model_version", "layered", "--save_path",
                           str(tmp_path / "out"), "--device", "cpu", "--from_file", str(lines),
                           "--automatic_prompt_lang_for_layered", "en", "--output_layers", "2", *memory])
    assert len(recorded_generations) == 1  # only the line without text is captioned
    prompts = sorted(Image.open(p).text["prompt"] for p in saved if p.stem.endswith("composite"))
    assert len(prompts) == 2 and "with text" in prompts and all(prompts)


def test_text_encoder_without_lm_head_is_refused_before_loading(tmp_path, layered_models, capsys):
    picture(tmp_path / "a.png", (64, 64), (30, 30, 200, 255), rgba=True)
    from musubi_tuner.qwen_image_generate_image import main as generate_main

    with pytest.raises(SystemExit):
        generate_main(["--dit", str(layered_models["dit"]), "--vae", str(layered_models["vae"]), "--text_encoder",
                       str(layered_models["comfy_text_encoder"]), "--model_version", "layered", "--save_path",
                       str(tmp_path / "out"), "--device", "cpu", "--control_image_path", str(tmp_path / "a.png")])
    err = capsys.readouterr().err
    assert "lm_head" in err and "give a prompt" in err and "Traceback" not in err


def test_layered_training_samples_caption_once(tmp_path, monkeypatch):
    from conftest import make_cached_dataset, train_args

    from musubi_tuner.qwen_image import generation as generate
    from musubi_tuner.qwen_image_train_network import main as train_main

    models = write_tiny_models(tmp_path / "models", VERSIONS["layered"])
    te = tiny.tiny_text_encoder(tiny.tiny_tokenizer())  # the same text encoder with its lm_head, for the caches too
    save_safetensors({to_comfy_key(k): v for k, v in te.state_dict().items()}, models["text_encoder"])
    models, toml = make_cached_dataset(tmp_path, "layered", n=2)
    calls = []
    real = generate.caption_image
    monkeypatch.setattr(generate, "caption_image", lambda *a, **kw: calls.append(a[3]) or real(*a, **kw))
    ctrl = sorted((tmp_path / "data").glob("*.png"))[0]
    prompts = tmp_path / "prompts.json"  # an entry without a prompt (a text line starting with --ci is prompt text)
    prompts.write_text(json.dumps([{"control_image_path": str(ctrl), "frame_count": 2, "sample_steps": 2, "seed": 5}]))
    args = train_args(models, toml, tmp_path / "out", "layered", "--max_train_steps", "2", "--sample_prompts",
                      str(prompts), "--sample_every_n_steps", "1", "--sample_at_first",
                      "--automatic_prompt_lang_for_layered", "en")
    result = train_main(args)
    samples = sorted(result["sample_dir"].glob("*_composite.png"))
    assert len(samples) == 3 and calls == ["en"]
    used = {Image.open(p).text["prompt"] for p in samples}
    assert len(used) == 1 and all(used)


def test_interactive_lines_without_text(tmp_path, layered_models, monkeypatch, capsys):
    """In --interactive, a layered line of options only is captioned; with a text encoder that has no lm_head the
    line is refused with the fix named, and the session goes on."""
    from musubi_tuner.qwen_image_generate_image import main as generate_main

    picture(tmp_path / "a.png", (64, 64), (30, 30, 200, 255), rgba=True)
    line = f"--ci {tmp_path / 'a.png'} --s 2 --d 3 --l 1"
    from conftest import console_input

    for te, expect_saved in (("comfy_text_encoder", 0), ("text_encoder", 3)):
        console_input(monkeypatch, [line])
        saved = generate_main(["--dit", str(layered_models["dit"]), "--vae", str(layered_models["vae"]),
                               "--text_encoder", str(layered_models[te]), "--model_version", "layered", "--interactive",
                               "--automatic_prompt_lang_for_layered", "en", "--device", "cpu", "--save_path",
                               str(tmp_path / te), "--output_layers", "2"])
        out = capsys.readouterr().out
        assert len(saved) == expect_saved
        if expect_saved:
            assert "automatic caption (en)" in out and Image.open(saved[0]).text["automatic_caption"] == "en"
        else:
            assert "error:" in out and "lm_head" in out and "give a prompt" in out


# caption_images_by_qwen_vl.py --------------------------------------------------------------------------------------

def test_caption_tool_equals_transformers_generate_and_skips_what_is_done(tmp_path, layered_models, capsys):
    """Greedy captions equal transformers' generate on the same weights (transformers' own processor and model, the
    Qwen2.5-VL chat turn of an image then the prompt written out here); text and JSONL outputs; captioned images are
    skipped; the JSONL is what image_jsonl_file reads; ComfyUI's text-encoder file (no lm_head) is refused first."""
    from transformers import AutoProcessor

    from musubi_tuner.caption_images_by_qwen_vl import main as caption_main
    from musubi_tuner.tools.caption import DEFAULT_PROMPT

    folder = tmp_path / "imgs"
    folder.mkdir()
    picture(folder / "a.png", (280, 252), (200, 30, 30))  # a size the VL bucket keeps (multiples of 28, >= 256²)
    picture(folder / "b.png", (252, 280), (30, 30, 200))
    common = ["--image_dir", str(folder), "--model_path", str(layered_models["text_encoder"]), "--max_new_tokens",
              "12", "--device", "cpu"]
    r = caption_main(common + ["--output_format", "text"])
    assert r["captioned"] == 2 and (folder / "a.txt").is_file()

    proc = AutoProcessor.from_pretrained(layered_models["tokenizer"])
    te = tiny.tiny_text_encoder(tiny.tiny_tokenizer())
    te.generation_config = GenerationConfig.from_pretrained(layered_models["tokenizer"])
    text = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
            "<|vision_start|><|image_pad|><|vision_end|>" + DEFAULT_PROMPT + "<|im_end|>\n<|im_start|>assistant\n")
    for name in ("a", "b"):
        inputs = proc(text=[text], images=[Image.open(folder / f"{name}.png").convert("RGB")], return_tensors="pt")
        ids = te.generate(**inputs, max_new_tokens=12)
        want = proc.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True,
                                 clean_up_tokenization_spaces=False)[0].strip()
        assert (folder / f"{name}.txt").read_text().strip() == want and want

    # --caption_extension names the files; --prompt is what the model is asked
    r = caption_main(common + ["--output_format", "text", "--caption_extension", ".caption", "--prompt",
                               "Describe\\nthe shape."])
    assert r["captioned"] == 2 and (folder / "a.caption").is_file()
    inputs = proc(text=[text.replace(DEFAULT_PROMPT, "Describe\nthe shape.")],
                  images=[Image.open(folder / "a.png").convert("RGB")], return_tensors="pt")
    ids = te.generate(**inputs, max_new_tokens=12)
    want = proc.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True,
                             clean_up_tokenization_spaces=False)[0].strip()
    assert (folder / "a.caption").read_text().strip() == want
    # a second run skips both; --overwrite does them again
    assert caption_main(common + ["--output_format", "text"])["captioned"] == 0
    assert caption_main(common + ["--output_format", "text", "--overwrite"])["captioned"] == 2
    # JSONL: read by a dataset config's image_jsonl_file
    jsonl = tmp_path / "captions.jsonl"
    r = caption_main(common + ["--output_file", str(jsonl)])
    assert r["captioned"] == 2 and caption_main(common + ["--output_file", str(jsonl)])["captioned"] == 0
    from musubi_tuner.dataset.config import load_dataset_config
    from musubi_tuner.dataset.items import collect_items

    toml = tmp_path / "d.toml"
    toml.write_text(f'[[datasets]]\nresolution = 64\nimage_jsonl_file = "{jsonl}"\ncache_directory = "{tmp_path / "c"}"\n')
    items = collect_items(load_dataset_config(toml), VERSIONS["original"])
    assert sorted(i.caption for i in items) == sorted((folder / f"{n}.txt").read_text().strip() for n in "ab")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        caption_main(["--image_dir", str(folder), "--model_path", str(layered_models["comfy_text_encoder"]),
                      "--output_format", "text", "--overwrite"])
    err = capsys.readouterr().err
    assert "lm_head" in err and "Traceback" not in err
