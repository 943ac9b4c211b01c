"""Every loader gives tensors identical to the originals, for every real key layout, and refuses wrong files."""

import json

import pytest
import torch
from layouts import diffusers_vae_key_to_wan, write_sharded, write_single

from musubi_tuner.errors import UserError
from musubi_tuner.qwen_image import tiny
from musubi_tuner.qwen_image.dit import load_dit
from musubi_tuner.qwen_image.model_files import COMFY_DIT_PREFIX as COMFY_PREFIX, ZERO_COND_MARKER
from musubi_tuner.qwen_image.text_encoder import load_text_encoder, load_tokenizer, to_comfy_key
from musubi_tuner.qwen_image.vae import load_vae
from musubi_tuner.models.registry import VERSIONS, resolve_version


def assert_same_state(model, reference):
    got, want = model.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("layout", ["diffusers_file_config", "sharded_first_shard", "sharded_folder_no_config",
                                    "comfy_bare", "comfy_prefixed"])
def test_dit_layouts(tmp_path, layout):
    ref = tiny.tiny_dit(seed=3)
    sd = ref.state_dict()
    if layout == "diffusers_file_config":
        path = write_single(sd, tmp_path / "diffusion_pytorch_model.safetensors")
        (tmp_path / "config.json").write_text(json.dumps(dict(ref.config)))
    elif layout == "sharded_first_shard":
        path = write_sharded(sd, tmp_path, "diffusion_pytorch_model", 3, dict(ref.config))[0]
    elif layout == "sharded_folder_no_config":
        write_sharded(sd, tmp_path, "diffusion_pytorch_model", 2)
        path = tmp_path
    elif layout == "comfy_bare":
        path = write_single(sd, tmp_path / "qwen_image_bf16.safetensors")
    else:
        path = write_single(sd, tmp_path / "qwen_image_bf16.safetensors", prefix=COMFY_PREFIX)
    model = load_dit(path, VERSIONS["original"], torch.float32)
    assert_same_state(model, ref)
    assert model.config.num_layers == 2 and model.config.num_attention_heads == 2
    assert tuple(model.config.axes_dims_rope) == tuple(ref.config.axes_dims_rope)


def test_dit_bf16_load_and_model_version_switches(tmp_path):
    ref = tiny.tiny_dit(VERSIONS["edit-2511"], seed=1)
    path = write_single(ref.state_dict(), tmp_path / "edit2511.safetensors", prefix=COMFY_PREFIX,
                        extra={ZERO_COND_MARKER: torch.tensor([])})
    model = load_dit(path, VERSIONS["edit-2511"], torch.bfloat16)
    assert model.config.zero_cond_t and model.transformer_blocks[0].zero_cond_t
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    for k, v in ref.state_dict().items():
        assert torch.equal(model.state_dict()[k], v.to(torch.bfloat16))

    layered = tiny.tiny_dit(VERSIONS["layered"], seed=1)
    lpath = write_single(layered.state_dict(), tmp_path / "layered.safetensors")
    model = load_dit(lpath, VERSIONS["layered"], torch.float32)
    assert model.config.use_additional_t_cond and model.config.use_layer3d_rope
    assert_same_state(model, layered)
    with pytest.raises(UserError, match="--model_version layered"):
        load_dit(lpath, VERSIONS["original"], torch.float32)


def test_dit_refuses_fp8_and_wrong_files(tmp_path):
    sd = tiny.tiny_dit().state_dict()
    fp8 = {k: (v.to(torch.float8_e4m3fn) if v.ndim == 2 else v) for k, v in sd.items()}
    path = write_single(fp8, tmp_path / "qwen_image_fp8_e4m3fn.safetensors")
    with pytest.raises(UserError, match="already fp8.*qwen_image_bf16.safetensors"):
        load_dit(path, VERSIONS["original"])
    scaled = write_single(sd, tmp_path / "scaled.safetensors", extra={"scaled_fp8": torch.zeros(0)})
    with pytest.raises(UserError, match="already fp8"):
        load_dit(scaled, VERSIONS["original"])
    vae_file = write_single(tiny.tiny_vae().state_dict(), tmp_path / "vae.safetensors")
    with pytest.raises(UserError, match="is a 3-channel .RGB. VAE, not the Qwen-Image DiT"):
        load_dit(vae_file, VERSIONS["original"])
    with pytest.raises(UserError, match="file not found"):
        load_dit(tmp_path / "nope.safetensors", VERSIONS["original"])
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(UserError, match="not a valid safetensors"):
        load_dit(tmp_path / "broken.safetensors", VERSIONS["original"])
    shards = write_sharded(sd, tmp_path / "sh", "diffusion_pytorch_model", 3)
    shards[1].unlink()
    with pytest.raises(UserError, match="incomplete.*00002-of-00003"):
        load_dit(shards[0], VERSIONS["original"])


@pytest.mark.parametrize("channels", [3, 4])
@pytest.mark.parametrize("layout", ["diffusers", "wan"])
def test_vae_layouts(tmp_path, layout, channels):
    ref = tiny.tiny_vae(channels, seed=5)
    sd = ref.state_dict()
    if layout == "wan":
        sd = {diffusers_vae_key_to_wan(k): v for k, v in sd.items()}
        assert "conv1.bias" in sd and any(k.startswith("decoder.upsamples.") for k in sd)
    path = write_single(sd, tmp_path / "qwen_image_vae.safetensors")
    vae = load_vae(path, torch.float32, expected_channels=channels)
    assert vae.config.input_channels == channels
    assert_same_state(vae, ref)
    with pytest.raises(UserError, match="layered" if channels == 3 else "RGBA"):
        load_vae(path, torch.float32, expected_channels=7 - channels)


def test_vae_refuses_dit(tmp_path):
    path = write_single(tiny.tiny_dit().state_dict(), tmp_path / "dit.safetensors")
    with pytest.raises(UserError, match="is a Qwen-Image DiT, not the Qwen-Image VAE"):
        load_vae(path)


def test_text_encoder_comfy_file_and_transformers_folder(tmp_path):
    tok = tiny.tiny_tokenizer()
    ref = tiny.tiny_text_encoder(tok, seed=2)
    # ComfyUI single file, no config beside it: the config is inferred from shapes
    sd = {to_comfy_key(k): v for k, v in ref.state_dict().items()}
    assert any(k.startswith("visual.") for k in sd) and any(k.startswith("model.layers.") for k in sd)
    path = write_single(sd, tmp_path / "comfy" / "qwen_2.5_vl_7b.safetensors")
    te = load_text_encoder(path, torch.float32)
    assert_same_state(te, ref)
    # transformers folder (config.json + safetensors)
    ref.save_pretrained(tmp_path / "hf")
    te2 = load_text_encoder(tmp_path / "hf", torch.float32)
    assert_same_state(te2, ref)
    # same hidden states
    ids = tok(["<|im_start|>hello"], return_tensors="pt").input_ids
    with torch.no_grad():
        a = te(input_ids=ids, output_hidden_states=True).hidden_states[-1]
        b = ref(input_ids=ids, output_hidden_states=True).hidden_states[-1]
    assert torch.equal(a, b)
    with pytest.raises(UserError, match="is a Qwen-Image DiT, not the text encoder"):
        load_text_encoder(write_single(tiny.tiny_dit().state_dict(), tmp_path / "d.safetensors"))


def test_tokenizer_resolution(tmp_path, tiny_models, monkeypatch):
    tok = load_tokenizer(None, str(tiny_models["text_encoder"]))  # files beside the text encoder
    assert tok.convert_tokens_to_ids("<|im_start|>") is not None
    tok2 = load_tokenizer(str(tiny_models["tokenizer"]))
    assert tok2("a b").input_ids == tok("a b").input_ids
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lone = write_single({"x": torch.zeros(1)}, tmp_path / "alone" / "te.safetensors")
    with pytest.raises(UserError, match="--tokenizer"):
        load_tokenizer(None, str(lone))
    with pytest.raises(UserError, match="no tokenizer files"):
        load_tokenizer(str(tmp_path))


def test_resolve_version():
    assert resolve_version(None).name == "original"
    assert resolve_version(None, edit=True).name == "edit"
    assert resolve_version(None, edit_plus=True).name == "edit-2509"
    assert resolve_version("edit-2511").zero_cond_t
    assert resolve_version("layered").vae_channels == 4 and resolve_version("layered").arch_tag == "qil"
    with pytest.raises(UserError):
        resolve_version("edit-2511", edit=True)


RSS_PROBE = r"""
import sys, torch
from pathlib import Path
from musubi_tuner.memory.fp8 import quantize_weight
from musubi_tuner.qwen_image.weights import load_tensors

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

quantise = (lambda k, t: dict(zip((k, k + ".s"), quantize_weight(t)))) if sys.argv[2] == "fp8" else None
base = rss("VmRSS:")
sd = load_tensors([Path(sys.argv[1])], torch.bfloat16, transform=quantise)
size = sum(t.numel() * t.element_size() for t in sd.values())
print(base, rss("VmHWM:"), size)
"""


def load_in_fresh_process(path, mode: str) -> tuple[int, int]:
    """(peak RSS growth, loaded bytes) of load_tensors(path) in bf16 (mode "bf16") or quantised to fp8 as it streams
    (mode "fp8"), measured in a fresh process."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", RSS_PROBE, str(path), mode], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    base, peak, size = map(int, out.stdout.split())
    return peak - base, size


def test_loader_peak_rss_stays_near_one_copy(tmp_path):
    """A 2 GB bf16 file loads with peak RSS growth under 1.3x its converted size (measured in a fresh process)."""
    from musubi_tuner.fileio import save_safetensors_streaming

    path = tmp_path / "big.safetensors"
    chunk = torch.zeros(4096, 4096, dtype=torch.bfloat16)  # 32 MiB each
    save_safetensors_streaming({f"blocks.{i}.weight": chunk for i in range(64)}, path)
    grown, size = load_in_fresh_process(path, "bf16")
    growth = grown / size
    print(f"loader: {size / 2**30:.2f} GiB loaded, peak RSS growth {growth:.3f}x")
    assert size == 2 * 2**30 and growth < 1.3


@pytest.mark.parametrize("source", [torch.bfloat16, torch.float16, torch.float32])
def test_mapped_loader_is_bit_identical_to_load_file(tmp_path, source):
    """Every conversion the loader makes (to bf16, fp32, fp8, or none) gives load_file's tensors converted the same
    way, bit for bit; an odd-sized tensor before a wider one (unaligned in the file) included; fp8 scaled as the
    quantiser gives it from load_file's tensor."""
    from safetensors.torch import load_file

    from musubi_tuner.fileio import save_safetensors
    from musubi_tuner.memory.fp8 import quantize_weight
    from musubi_tuner.qwen_image.weights import load_tensors

    g = torch.Generator().manual_seed(0)
    tensors = {"a.odd": torch.randn(3, 5, generator=g).to(source), "b.weight": torch.randn(64, 48, generator=g).to(source),
               "c.wide": torch.randn(7, generator=g).double(), "d.ids": torch.arange(5, dtype=torch.int64),
               "e.empty": torch.zeros(0, 4, dtype=source)}
    path = tmp_path / "w.safetensors"
    save_safetensors(tensors, path)
    ref = load_file(path)
    for target in (None, torch.bfloat16, torch.float32, torch.float8_e4m3fn):
        got = load_tensors([path], target)
        assert got.keys() == ref.keys()
        for k, r in ref.items():
            want = r.to(target) if target is not None and r.is_floating_point() else r
            assert got[k].dtype == want.dtype and got[k].shape == want.shape, (k, target)
            assert torch.equal(got[k].view(torch.uint8), want.view(torch.uint8)), (k, target)
    q = load_tensors([path], torch.bfloat16, transform=lambda k, t: dict(zip((k, k + ".scale"), quantize_weight(t)))
                     if k == "b.weight" else {k: t})
    w32 = ref["b.weight"].to(torch.bfloat16).float()  # the per-row formula, spelled out
    want_s = (w32.abs().amax(dim=1, keepdim=True) / torch.finfo(torch.float8_e4m3fn).max).clamp(min=1e-12)
    want_q = (w32 / want_s).to(torch.float8_e4m3fn)
    assert torch.equal(q["b.weight"].view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(q["b.weight.scale"],
                                                                                                   want_s)
    from musubi_tuner.memory.fp8 import _quantize_rows

    bq, bs = _quantize_rows(w32.to(torch.bfloat16), rows=7)  # bands that do not divide the rows
    assert torch.equal(bq.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(bs, want_s)


def test_kept_tensors_are_copy_on_write_views_of_the_file(tmp_path):
    """A tensor loaded in its file dtype shares the page cache (no copy); writing into it (training) never changes
    the file."""
    from musubi_tuner.fileio import save_safetensors
    from musubi_tuner.qwen_image.weights import load_tensors

    path = tmp_path / "w.safetensors"
    save_safetensors({"w": torch.ones(1024, 1024, dtype=torch.bfloat16)}, path)
    before = path.read_bytes()
    w = load_tensors([path], torch.bfloat16)["w"]
    w.mul_(3)
    assert float(w[0, 0]) == 3.0 and path.read_bytes() == before
    assert float(load_tensors([path], torch.bfloat16)["w"][0, 0]) == 1.0


def test_fp8_load_peaks_near_the_fp8_size(tmp_path):
    """bf16 -> fp8 scaled as the file streams: peak RSS growth at most 0.6x the bf16 file (the fp8 model is 0.5x;
    each source tensor's pages are given back once it is quantised)."""
    from musubi_tuner.fileio import save_safetensors_streaming

    path = tmp_path / "big.safetensors"
    chunk = torch.full((2048, 2048), 0.5, dtype=torch.bfloat16)  # 8 MiB each (the quantiser's fp32 temporaries of
    save_safetensors_streaming({f"blocks.{i}.weight": chunk for i in range(128)}, path)  # one tensor are 4x that)
    grown, _ = load_in_fresh_process(path, "fp8")
    growth = grown / path.stat().st_size
    print(f"bf16 -> fp8: peak RSS growth {growth:.3f}x the bf16 file")
    assert growth < 0.6
