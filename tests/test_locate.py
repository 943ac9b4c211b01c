"""Model paths as users give them: a ComfyUI models/ folder or a Hugging Face repo id (read from a local hub cache that
the test builds; downloads cannot run here), resolved by every script before anything loads."""

from __future__ import annotations

import shutil

import pytest

from musubi_tuner.errors import UserError
from musubi_tuner.models.locate import is_repo_id, locate
from musubi_tuner.models.registry import VERSIONS
from musubi_tuner.qwen_image.tiny import write_tiny_models
from musubi_tuner.qwen_image_generate_image import main as generate_main


def comfy_folder(root, models):
    m = root / "ComfyUI" / "models"
    for sub, src in (("diffusion_models", models["dit"]), ("vae", models["vae"]), ("text_encoders", models["text_encoder"])):
        (m / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(src, m / sub / src.name)
    (m / "text_encoders" / "t5xxl_fp16.safetensors").write_bytes(b"")  # another model's file beside ours
    return m


def hub_cache(root, models, repo="Qwen/Qwen-Image", sha="0123456789abcdef0123456789abcdef01234567"):
    cache = root / "hub"
    base = cache / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / sha
    (snap / "transformer").mkdir(parents=True)
    (snap / "vae").mkdir()
    shutil.copy(models["dit"], snap / "transformer" / "diffusion_pytorch_model.safetensors")
    shutil.copy(models["vae"], snap / "vae" / "diffusion_pytorch_model.safetensors")
    shutil.copytree(models["tokenizer"], snap / "text_encoder")
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(sha)
    return cache, snap


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    import huggingface_hub.constants as C

    def use(cache):
        monkeypatch.setattr(C, "HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(C, "HF_HUB_OFFLINE", True)
    return use


def test_repo_ids_and_paths_are_told_apart(tmp_path):
    assert is_repo_id("Qwen/Qwen-Image") and is_repo_id("Comfy-Org/Qwen-Image_ComfyUI")
    assert not is_repo_id("models/dit.safetensors") and not is_repo_id("/abs/path") and not is_repo_id("dit")
    (tmp_path / "Qwen" / "Qwen-Image").mkdir(parents=True)
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert not is_repo_id("Qwen/Qwen-Image")  # a local folder of that name wins
    finally:
        os.chdir(cwd)


def test_comfyui_models_folder(tmp_path):
    models = write_tiny_models(tmp_path / "tiny")
    m = comfy_folder(tmp_path, models)
    assert locate(str(m), "dit", VERSIONS["original"]).endswith("diffusion_models/" + models["dit"].name)
    assert locate(str(m), "text_encoder").endswith("text_encoders/" + models["text_encoder"].name)
    saved = generate_main(["--dit", str(m), "--vae", str(m), "--text_encoder", str(m), "--tokenizer",
                           str(models["tokenizer"]), "--prompt", "a cat", "--image_size", "32", "32", "--infer_steps",
                           "2", "--save_path", str(tmp_path / "out"), "--device", "cpu"])
    assert saved and saved[0].exists()
    with pytest.raises(UserError, match="layered"):  # the 3-channel VAE does not fit layered
        locate(str(m), "vae", VERSIONS["layered"])
    shutil.copy(models["dit"], m / "diffusion_models" / "second.safetensors")
    with pytest.raises(UserError, match="several files fit.*pass the one you mean"):
        locate(str(m), "dit", VERSIONS["original"])


def test_hub_repo_id_read_from_the_cache(tmp_path, offline_hub):
    models = write_tiny_models(tmp_path / "tiny")
    cache, snap = hub_cache(tmp_path, models)
    offline_hub(cache)
    assert locate("Qwen/Qwen-Image", "dit") == str(snap / "transformer")
    saved = generate_main(["--dit", "Qwen/Qwen-Image", "--vae", "Qwen/Qwen-Image", "--text_encoder", "Qwen/Qwen-Image",
                           "--prompt", "a cat", "--image_size", "32", "32", "--infer_steps", "2", "--save_path",
                           str(tmp_path / "out"), "--device", "cpu"])
    assert saved and saved[0].exists()


def test_unknown_repo_is_one_line(tmp_path, offline_hub, capsys):
    offline_hub(tmp_path / "empty_hub")
    with pytest.raises(SystemExit):
        generate_main(["--dit", "nobody/nothing", "--prompt", "x", "--save_path", str(tmp_path / "o")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "--dit nobody/nothing" in err[0] and "no such file or folder here" in err[0], err


def test_fetch_command_reads_the_cache_and_refuses_a_non_repo(tmp_path, offline_hub, capsys):
    from musubi_tuner.models.locate import main as fetch_main

    models = write_tiny_models(tmp_path / "tiny")
    cache, snap = hub_cache(tmp_path, models)
    offline_hub(cache)
    assert fetch_main(["Qwen/Qwen-Image"]) == snap
    with pytest.raises(SystemExit):
        fetch_main(["not-a-repo"])
    assert "error: 'not-a-repo' is not a Hugging Face repo id" in capsys.readouterr().err
