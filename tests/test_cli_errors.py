"""Bad input gives one clear error line naming the file or option, exit code 2, and writes nothing."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from layouts import write_single

from musubi_tuner.qwen_image import tiny
from musubi_tuner.qwen_image_generate_image import main as generate_main

SCRIPT = Path(__file__).parents[1] / "src" / "musubi_tuner" / "qwen_image_generate_image.py"


def run_cli_inprocess(capsys, argv):
    with pytest.raises(SystemExit) as e:
        generate_main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0]


def base_args(tiny_models, out, dit=None):
    return ["--dit", str(dit or tiny_models["dit"]), "--vae", str(tiny_models["vae"]),
            "--text_encoder", str(tiny_models["text_encoder"]), "--save_path", str(out), "--prompt", "x",
            "--infer_steps", "2", "--image_size", "64", "64", "--device", "cpu"]


def test_fp8_dit(tmp_path, capsys, tiny_models):
    sd = {k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 else v) for k, v in tiny.tiny_dit().state_dict().items()}
    fp8 = write_single(sd, tmp_path / "qwen_image_fp8_e4m3fn.safetensors")
    out = tmp_path / "out"
    line = run_cli_inprocess(capsys, base_args(tiny_models, out, fp8))
    assert "qwen_image_fp8_e4m3fn.safetensors" in line and "bf16" in line
    assert not out.exists() or not any(out.iterdir())


def test_missing_file(tmp_path, capsys, tiny_models):
    out = tmp_path / "out"
    line = run_cli_inprocess(capsys, base_args(tiny_models, out, tmp_path / "missing.safetensors"))
    assert "--dit" in line and "missing.safetensors" in line and "not found" in line
    assert not out.exists()


def test_vae_as_dit(tmp_path, capsys, tiny_models):
    out = tmp_path / "out"
    line = run_cli_inprocess(capsys, base_args(tiny_models, out, tiny_models["vae"]))
    assert "--dit" in line and "is a 3-channel (RGB) VAE, not the Qwen-Image DiT" in line
    assert not out.exists() or not any(out.iterdir())


def test_image_size_not_multiple_of_16(tmp_path, capsys, tiny_models):
    out = tmp_path / "out"
    args = base_args(tiny_models, out)
    args[args.index("--image_size") + 1] = "100"
    line = run_cli_inprocess(capsys, args)
    assert "--image_size 100 64" in line and "multiples of 16" in line and "try 96 64" in line
    assert not out.exists()


def test_blocks_to_swap_out_of_range(tmp_path, capsys, tiny_models, monkeypatch):
    from musubi_tuner.qwen_image import dit

    monkeypatch.setattr(dit, "load_tensors", lambda *a, **k: pytest.fail("DiT weights were read before the check"))
    line = run_cli_inprocess(capsys, base_args(tiny_models, tmp_path / "o") + ["--blocks_to_swap", "4"])
    assert "--blocks_to_swap must be between 1 and 1" in line


def test_real_cli_subprocess(tmp_path, tiny_models):
    """The command exactly as documented: python src/musubi_tuner/qwen_image_generate_image.py ..."""
    out = tmp_path / "out"
    bad = subprocess.run([sys.executable, str(SCRIPT), *base_args(tiny_models, out, tmp_path / "nope.safetensors")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: --dit")
    assert "Traceback" not in bad.stderr
    ok = subprocess.run([sys.executable, str(SCRIPT), *base_args(tiny_models, out)], capture_output=True, text=True,
                        timeout=300)
    assert ok.returncode == 0, ok.stderr
    pngs = list(out.glob("*.png"))
    assert len(pngs) == 1 and not list(out.glob(".*tmp"))


def test_text_encoder_cpu_and_missing_attention_backend(tmp_path, capsys, tiny_models, monkeypatch):
    saved = generate_main(base_args(tiny_models, tmp_path / "a") + ["--text_encoder_cpu", "--output_type", "latent"])
    assert saved[0].exists()

    def no_model(*a, **k):
        raise AssertionError("a model was loaded before the attention backend was checked")

    monkeypatch.setattr("musubi_tuner.qwen_image.generation.load_text_encoder", no_model)
    line = run_cli_inprocess(capsys, base_args(tiny_models, tmp_path / "b") + ["--attn_mode", "xformers"])
    assert "--attn_mode xformers" in line and "--attn_mode sdpa" in line


@pytest.mark.parametrize("extra,words", [(["--compile_backend", "nope"], ["--compile_backend", "nope", "inductor"]),
                                         (["--compile_mode", "reduce-overhead", "--blocks_to_swap", "1"],
                                          ["reduce-overhead", "--blocks_to_swap"])])
def test_compile_options(tmp_path, capsys, tiny_models, extra, words):
    out = tmp_path / "out"
    line = run_cli_inprocess(capsys, base_args(tiny_models, out) + ["--compile"] + extra)
    assert all(w in line for w in words), line
    assert not out.exists() or not any(out.iterdir())
