"""Coming from musubi-tuner: its caches, config files, prompt files, options, network modules and metadata carry over.

Each test states the musubi-tuner behaviour it checks (from its code, snapshot in FACTS.md)."""

import io
import json
import math
import shutil
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_cached_dataset, train_args
from test_timesteps_optim import _lrs
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from musubi_tuner.dataset.config import load_dataset_config
from musubi_tuner.dataset.items import collect_items
from musubi_tuner.dataset.prepare import prepare_item
from musubi_tuner.errors import UserError
from musubi_tuner.generation.prompts import GenerationSpec, read_prompt_file
from musubi_tuner.models.registry import VERSIONS
from musubi_tuner.qwen_image_cache_latents import main as cache_latents_main
from musubi_tuner.qwen_image_cache_text_encoder_outputs import main as cache_te_main
from musubi_tuner.qwen_image_generate_image import main as generate_main
from musubi_tuner.qwen_image_train import main as full_main
from musubi_tuner.qwen_image_train_network import main as train_main


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_cached_dataset(tmp_path_factory.mktemp("mig"), "original", n=4, batch_size=1)


def run(data, out, *extra, steps=2, main=train_main):
    models, toml = data
    return main(train_args(models, toml, out, "original", "--max_train_steps", str(steps), "--learning_rate", "1e-2",
                           *extra))


# caches -----------------------------------------------------------------------------------------------------------

def to_musubi(cache_dir: Path, dtype=torch.bfloat16) -> dict[str, bytes]:
    """Rewrite our caches as musubi-tuner writes them: same names, its tensor keys in its dtype, only its metadata."""
    originals = {}
    for f in sorted(cache_dir.glob("*.safetensors")):
        with safe_open(str(f), "pt") as sf:
            md, tensors = sf.metadata(), {k: sf.get_tensor(k) for k in sf.keys()}
        if f.name.endswith("_te.safetensors"):
            (k, v), = tensors.items()
            tensors = {f"varlen_vl_embed_{str(dtype)[6:]}": v.to(dtype)}
            meta = {"architecture": "qwen_image", "caption1": md["caption1"], "format_version": "1.0.1"}
        else:
            tensors = {k.rsplit("_", 1)[0] + f"_{str(dtype)[6:]}": v.to(dtype) for k, v in tensors.items()}
            meta = {"architecture": "qwen_image", "width": md["width"], "height": md["height"], "format_version": "1.0.1"}
        save_file(tensors, str(f), metadata=meta)
        originals[f.name] = f.read_bytes()
    return originals


@pytest.mark.parametrize("version", ["original", "edit-2509"])
def test_musubi_cache_set_trains_and_is_never_overwritten(tmp_path, version):
    models, toml = make_cached_dataset(tmp_path, version, n=2, batch_size=1)
    cache = tmp_path / "cache"
    originals = to_musubi(cache)
    assert all("latents_" in k or "varlen" in k for f in cache.glob("*.safetensors") for k in load_file(str(f)))
    r = train_main(train_args(models, toml, tmp_path / "out", version, "--max_train_steps", "2"))
    assert r["steps"] == 2 and all(math.isfinite(x) for x in r["losses"])
    # a foreign file that no item uses (musubi writes caches of images that were later removed) is kept
    stray = cache / "removed_0064x0064_" f"{VERSIONS[version].arch_tag}.safetensors"
    shutil.copy(next(cache.glob(f"*_{VERSIONS[version].arch_tag}.safetensors")), stray)
    common = ["--dataset_config", str(toml), "--model_version", version, "--device", "cpu"]
    for extra in (["--skip_existing"], []):
        lat = cache_latents_main(common + ["--vae", str(models["vae"]), *extra])
        te = cache_te_main(common + ["--text_encoder", str(models["text_encoder"]), *extra])
        assert lat["foreign"] == 2 and te["foreign"] == 2 and lat["cached"] == te["cached"] == 0
        assert {f.name: f.read_bytes() for f in cache.glob("*.safetensors") if f != stray} == originals
        assert stray.exists()


def test_foreign_cache_that_does_not_fit_is_an_error_not_an_overwrite(tmp_path, capsys):
    models, toml = make_cached_dataset(tmp_path, "original", n=2, batch_size=1)
    cache = tmp_path / "cache"
    to_musubi(cache)
    (tmp_path / "data" / "img000.txt").write_text("a caption musubi never saw")
    te_file = cache / "img000_qi_te.safetensors"
    before = te_file.read_bytes()
    with pytest.raises(SystemExit):
        cache_te_main(["--dataset_config", str(toml), "--text_encoder", str(models["text_encoder"]), "--device", "cpu"])
    err = capsys.readouterr().err
    assert "img000_qi_te.safetensors was not written by this tool" in err and "delete it" in err
    assert te_file.read_bytes() == before
    with pytest.raises(SystemExit):
        train_main(train_args(models, toml, tmp_path / "o", "original", "--max_train_steps", "1"))
    assert "does not fit" in capsys.readouterr().err


def test_edit_2509_cache_serves_2511(tmp_path, capsys):
    models, toml = make_cached_dataset(tmp_path, "edit-2509", n=2, batch_size=1)
    common = ["--dataset_config", str(toml), "--model_version", "edit-2511", "--device", "cpu", "--skip_existing"]
    assert cache_latents_main(common + ["--vae", str(models["vae"])])["skipped"] == 2
    assert cache_te_main(common + ["--text_encoder", str(models["text_encoder"])])["skipped"] == 2


# --config_file ----------------------------------------------------------------------------------------------------

def test_config_file_values_tables_and_command_line_precedence(tmp_path, data, caplog):
    models, toml = data
    cfg = tmp_path / "settings.toml"
    cfg.write_text(f'dit = "{models["dit"]}"\nvae = "{models["vae"]}"\ntext_encoder = "{models["text_encoder"]}"\n'
                   f'[training]\ndataset_config = "{toml}"\noutput_dir = "{tmp_path / "o"}"\noutput_name = "fromfile"\n'
                   'max_train_steps = 3\nlearning_rate = 0.01\nnetwork_dim = 8\n'
                   'optimizer_args = ["weight_decay=0.0"]\ngradient_checkpointing = true\nfp8_t5 = true\n'
                   '[other]\ndevice = "cpu"\nmax_data_loader_n_workers = 0\n')
    r = train_main(["--config_file", str(tmp_path / "settings"), "--max_train_steps", "2"])  # .toml appended
    assert r["steps"] == 2 and r["final"].name == "fromfile.safetensors"
    assert load_file(str(r["final"]))[next(k for k in load_file(str(r["final"])) if "lora_down" in k)].shape[0] == 8
    # a key of musubi-tuner's other architectures (WAN's fp8_t5) is ignored with a warning; a typo is an error
    assert "ignoring musubi-tuner option(s) for other model architectures: fp8_t5" in caplog.text
    cfg.write_text('network_dim = "eight"\n')
    with pytest.raises(SystemExit):
        train_main(["--config_file", str(cfg)])


# prompt files ------------------------------------------------------------------------------------------------------

def test_prompt_line_switches_as_musubi(tmp_path, caplog):
    """musubi-tuner's generation parser (qwen_image_generate_image.parse_prompt_line): case-sensitive switches,
    unknown ones ignored, --rcm_rel_th on only for 1/true/yes (bare: off), no --f."""
    mask = tmp_path / "m.png"
    Image.new("L", (16, 16)).save(mask)
    f = tmp_path / "p.txt"
    f.write_text(f"a cat --rcm_th 0.3 --rcm_rel_th 1 --w 64 --h 32 --W 128 --H 128 --m {mask} --i other.png --cn x\n"
                 "a dog --rcm_th 0.05 --rcm_rel_th\na cow --rcm_th 0.05 --rcm_rel_th no --g 6 --l 2.5 --f 3\n")
    a, b, c = read_prompt_file(f, GenerationSpec(prompt=""))
    assert (a.rcm_threshold, a.rcm_relative, a.width, a.height, a.mask_path) == (0.3, True, 64, 32, str(mask))
    assert not b.rcm_relative and not c.rcm_relative and c.guidance_scale == 2.5 and c.output_layers is None
    assert "--i is not an option" in caplog.text and "--cn is not an option" in caplog.text
    assert "--W is not an option" in caplog.text and "--f is not read from generation" in caplog.text
    # in sample prompts of training, --g is other models' embedded guidance: ignored, --l is CFG (musubi-tuner)
    caplog.clear()
    g_only = tmp_path / "g.txt"
    g_only.write_text("a cow --g 6\n")
    assert read_prompt_file(g_only, GenerationSpec(prompt="", guidance_scale=4.0), training=True)[0].guidance_scale == 4.0
    assert read_prompt_file(g_only, GenerationSpec(prompt="", guidance_scale=4.0))[0].guidance_scale == 6.0
    assert "--g (embedded guidance" in caplog.text


def test_sample_prompt_lines_as_musubi(tmp_path, caplog):
    """musubi-tuner's training-sample parser (training/sampling_prompts.line_to_prompt_dict): case-insensitive,
    --s clamped to 1000, no mask or RCM, a line starting with --ci is prompt text, a bare --n sets nothing."""
    mask = tmp_path / "m.png"
    Image.new("L", (16, 16)).save(mask)
    f = tmp_path / "p.txt"
    f.write_text(f"a cat --W 64 --H 32 --S 5000 --m {mask} --rcm_th 0.3 --F 3\n"
                 "--ci photo.png --w 64\nneg --n --d 3\n")
    a, b, c = read_prompt_file(f, GenerationSpec(prompt="", negative_prompt=None), training=True)
    assert (a.width, a.height, a.steps, a.mask_path, a.rcm_threshold, a.output_layers) == (64, 32, 1000, None, None, 3)
    assert "clamped to 1000" in caplog.text and "--m is not read from sample prompts" in caplog.text
    assert (b.prompt, b.control_images, b.width) == ("--ci photo.png", [], 64)
    assert (c.prompt, c.negative_prompt, c.seed) == ("neg", None, 3)
    # in generation a line that starts with a switch keeps the --prompt text (musubi-tuner: prompt None)
    g = tmp_path / "g.txt"
    g.write_text("--d 5 --w 32\n")
    d, = read_prompt_file(g, GenerationSpec(prompt="from the command line"))
    assert (d.prompt, d.seed, d.width) == ("from the command line", 5, 32)


def test_toml_and_json_prompt_files(tmp_path):
    toml = tmp_path / "p.toml"
    toml.write_text('[prompt]\nwidth = 64\nheight = 48\nsample_steps = 5\ncfg_scale = 3.0\n'
                    '[[prompt.subset]]\nprompt = "a red circle"\nseed = 1\n'
                    '[[prompt.subset]]\nprompt = "a blue square"\nwidth = 32\ndiscrete_flow_shift = 2.0\n')
    a, b = read_prompt_file(toml, GenerationSpec(prompt=""), training=True)
    assert (a.prompt, a.width, a.height, a.steps, a.guidance_scale, a.seed) == ("a red circle", 64, 48, 5, 3.0, 1)
    assert (b.prompt, b.width, b.flow_shift) == ("a blue square", 32, 2.0)
    js = tmp_path / "p.json"
    js.write_text(json.dumps(["a green cat --w 32 --h 32", {"prompt": "a dog", "height": 64, "width": 64,
                                                            "negative_prompt": "blurry"}]))
    c, d = read_prompt_file(js, GenerationSpec(prompt=""))
    assert (c.prompt, c.width) == ("a green cat", 32) and (d.prompt, d.negative_prompt) == ("a dog", "blurry")
    js.write_text(json.dumps([{"prompt": "x", "width": 60}]))
    with pytest.raises(UserError, match="width 60 must be a positive multiple of 16"):
        read_prompt_file(js, GenerationSpec(prompt=""))


# dataset config ---------------------------------------------------------------------------------------------------

def test_dataset_config_musubi_forms(tmp_path, caplog):
    img, ctrl = tmp_path / "img", tmp_path / "ctrl"
    img.mkdir()
    ctrl.mkdir()
    Image.new("RGB", (64, 64)).save(img / "a.png")
    (img / "a.txt").write_text("x")
    Image.new("RGB", (200, 100)).save(ctrl / "a.png")  # larger than the control area: resized to it
    Image.new("RGB", (40, 52)).save(ctrl / "a_1.png")  # smaller: native size, cropped to multiples of 16
    cfg = {"general": {"resolution": 100, "enable_bucket": True, "fp_latent_window_size": 9},
           "datasets": [{"image_directory": str(img), "control_directory": str(ctrl), "no_resize_control": True,
                         "control_resolution": [64, 64], "fp_1f_clean_indices": [0]},
                        {"video_directory": str(img), "target_frames": [1, 25]}]}
    path = tmp_path / "d.json"
    path.write_text(json.dumps(cfg))
    configs = load_dataset_config(path)
    assert len(configs) == 1 and configs[0].resolution == (100, 100)
    assert "fp_latent_window_size is a key of other architectures" in caplog.text and "video dataset" in caplog.text
    item = collect_items(configs, VERSIONS["edit-2509"])[0]
    sizes = [c.size for c in prepare_item(item, VERSIONS["edit-2509"]).control_images]
    assert sizes[1] == (32, 48) and sizes[0][0] * sizes[0][1] <= 64 * 64 and sizes[0][0] > sizes[0][1]
    assert all(v % 16 == 0 for s in sizes for v in s)
    path.write_text(json.dumps({"datasets": [{"image_directory": str(img), "resolution": 100,
                                              "enable_bucket": False}]}))
    with pytest.raises(UserError, match="multiples of 16 without enable_bucket"):
        load_dataset_config(path)


# LoRA patterns, LoHa, LoKr ----------------------------------------------------------------------------------------

def test_network_patterns_are_full_matches():
    from musubi_tuner.networks.lora_qwen_image import create_network
    from musubi_tuner.qwen_image.tiny import tiny_dit

    total = len(create_network(1.0, 4, 4, None, None, tiny_dit()).unet_loras)
    assert len(create_network(1.0, 4, 4, None, None, tiny_dit(), exclude_patterns="['.*attn']").unet_loras) == total
    no_attn = create_network(1.0, 4, 4, None, None, tiny_dit(), exclude_patterns="['.*attn.*']").unet_loras
    assert 0 < len(no_attn) < total and not any(".attn." in m.module_name for m in no_attn)


@pytest.mark.parametrize("module,keys", [("networks.loha", {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),
                                         ("networks.lokr", {"lokr_w1", "lokr_w2_a", "lokr_w2_b"})])
def test_loha_lokr_train_save_merge_and_continue(tmp_path, data, module, keys):
    from musubi_tuner.networks.lora_files import linear_module_names, load_lora, merge_lora
    from musubi_tuner.qwen_image.tiny import tiny_dit

    r = run(data, tmp_path / "o", "--network_module", module, "--network_dim", "4", "--network_alpha", "2", steps=3)
    sd = load_file(str(r["final"]))
    suffixes = {k.split(".", 1)[1] for k in sd}
    # LoKr: small layers (64 = 8 x 8) get a full w2, as LyCORIS does when the rank would not save anything
    assert keys | {"alpha"} <= suffixes <= keys | {"alpha", "lokr_w2"}
    assert all(k.startswith("lora_unet_transformer_blocks_") for k in sd)
    # the file changes a model exactly as the trained network does: merge vs the network applied
    net_mod = __import__(f"musubi_tuner.{module}", fromlist=["x"])
    dit_a, dit_b = tiny_dit(), tiny_dit()
    net = net_mod.create_network_from_weights(1.0, str(r["final"]), None, None, dit_a)
    net.apply_to(None, dit_a)
    net.eval()
    merge_lora(dit_b, load_lora(r["final"], linear_module_names(dit_b)))
    x, txt = torch.randn(1, 16, 64), torch.randn(1, 5, 256)
    kw = dict(timestep=torch.tensor([0.5]), encoder_hidden_states=txt, img_shapes=[[(1, 4, 4)]], return_dict=False)
    with torch.no_grad():
        a, b, base = dit_a(hidden_states=x, **kw)[0], dit_b(hidden_states=x, **kw)[0], tiny_dit()(hidden_states=x, **kw)[0]
    assert (a - base).abs().max() > 1e-4 and torch.allclose(a, b, atol=1e-4)
    # generation merges it, and training continues from it
    models, _ = data
    out = generate_main(["--dit", str(models["dit"]), "--vae", str(models["vae"]), "--text_encoder",
                         str(models["text_encoder"]), "--prompt", "x", "--image_size", "64", "64", "--infer_steps",
                         "2", "--device", "cpu", "--save_path", str(tmp_path / "g"), "--output_type", "latent",
                         "--lora_weight", str(r["final"])])
    assert out[0].is_file()
    cont = run(data, tmp_path / "c", "--network_module", module, "--network_dim", "4", "--network_alpha", "2",
               "--network_weights", str(r["final"]), "--learning_rate", "0", steps=1)
    assert all(torch.equal(v, load_file(str(cont["final"]))[k]) for k, v in sd.items())


def test_lokr_factorization_matches_lycoris_convention():
    from musubi_tuner.networks.lokr import factorization

    assert factorization(128) == (8, 16) and factorization(512) == (16, 32) and factorization(1024) == (32, 32)
    assert factorization(128, 4) == (4, 32) and factorization(3072, 8) == (8, 384)


# optimizer, schedules, timesteps ----------------------------------------------------------------------------------

def test_adafactor_defaults_as_musubi():
    from transformers.optimization import Adafactor, AdafactorSchedule

    from musubi_tuner.training.optim import build_optimizer, build_scheduler

    p = [torch.nn.Parameter(torch.randn(4, 4))]
    opt = build_optimizer("adafactor", p, 1e-3, [])
    assert isinstance(opt, Adafactor) and opt.defaults["relative_step"] and opt.defaults["scale_parameter"]
    sched = build_scheduler(opt, "constant", 10, learning_rate=1e-3)
    assert isinstance(sched, AdafactorSchedule)
    p[0].grad = torch.ones(4, 4)
    opt.step()
    sched.step()
    assert sched.get_last_lr()[0] > 0
    opt2 = build_optimizer("adafactor", [torch.nn.Parameter(torch.zeros(2))], 1e-3, ["relative_step=False"])
    assert not opt2.defaults["relative_step"] and opt2.defaults["lr"] == 1e-3


def test_more_lr_schedules():
    from transformers.optimization import get_scheduler as hf_scheduler

    from musubi_tuner.training.optim import build_scheduler

    def opt():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)

    a = _lrs(build_scheduler(opt(), "cosine_with_min_lr", 40, 5, min_lr_ratio=0.1), 40)
    b = _lrs(hf_scheduler("cosine_with_min_lr", opt(), 5, 40, scheduler_specific_kwargs={"min_lr_rate": 0.1}), 40)
    assert np.allclose(a, b) and min(a[5:]) >= 0.1 - 1e-9
    wsd = _lrs(build_scheduler(opt(), "warmup_stable_decay", 40, 4, decay_steps=0.25), 40)
    assert wsd[2] == 0.5 and wsd[10] == 1.0 and wsd[35] < 1.0
    isq = _lrs(build_scheduler(opt(), "inverse_sqrt", 40, 4, timescale=9), 30)
    assert abs(isq[29] - 1 / math.sqrt((29 + 9 - 4) / 9)) < 1e-9  # transformers: 1/sqrt((step + shift) / timescale)
    rex = _lrs(build_scheduler(opt(), "rex", 20, 0), 20)  # musubi's RexLR: min_lr 1% by default
    z = (20 - 5) / 20
    assert abs(rex[5] - (0.01 + 0.99 * z / (0.1 + 0.9 * z))) < 1e-9
    pc = _lrs(build_scheduler(opt(), "piecewise_constant", 20, scheduler_args=["step_rules='1:10,0.1'"]), 20)
    assert pc[5] == 1.0 and pc[15] == 0.1
    step = _lrs(build_scheduler(opt(), "constant", 20, scheduler_type="StepLR",
                                scheduler_args=["step_size=5", "gamma=0.5"]), 12)
    assert step[4] == 1.0 and step[5] == 0.5 and step[10] == 0.25


def test_qinglong_qwen_and_preserved_shape_and_buckets():
    from musubi_tuner.training.timesteps import sample_t, stratum

    g = torch.Generator().manual_seed(0)
    t = sample_t("qinglong_qwen", 200_000, g, image_seq_len=4096)
    # a mixture: 95% the resolution-shifted sigmoid (qwen_shift), 5% logsnr(5.36, 1) (low noise, t around 0.06)
    shifted = sample_t("qwen_shift", 200_000, torch.Generator().manual_seed(1), image_seq_len=4096)
    low = sample_t("logsnr", 200_000, torch.Generator().manual_seed(2), logit_mean=5.36, logit_std=1.0)
    for edge in (0.1, 0.15, 0.5, 0.9):
        want = 0.95 * (shifted < edge).float().mean() + 0.05 * (low < edge).float().mean()
        assert abs((t < edge).float().mean() - want) < 4e-3, edge
    assert t.min() >= 0 and t.max() <= 1
    t = sample_t("shift", 50_000, torch.Generator().manual_seed(1), shift=3.0, min_timestep=300, max_timestep=700,
                 preserve_distribution_shape=True)
    assert t.min() >= 0.3 and t.max() <= 0.7
    full = sample_t("shift", 400_000, torch.Generator().manual_seed(2), shift=3.0)
    kept = full[(full >= 0.3) & (full <= 0.7)]
    assert abs(t.mean() - kept.mean()) < 3e-3  # the conditional distribution, not a rescaled one
    strata = [stratum(7, i, 10) for i in range(30)]
    u = sample_t("uniform", 30, torch.Generator().manual_seed(3), strata=strata)
    for cycle in range(3):
        assert sorted((u[cycle * 10:(cycle + 1) * 10] * 10).floor().int().tolist()) == list(range(10))


def test_show_timesteps_prints_and_does_not_train(tmp_path, data, monkeypatch):
    monkeypatch.setattr("musubi_tuner.training.trainer.load_dit_with_options",
                        lambda *a, **k: pytest.fail("a model was loaded"))
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert run(data, tmp_path / "o", "--show_timesteps", "console", "--timestep_sampling", "qwen_shift") == {}
    text = buf.getvalue()
    assert "timesteps (qwen_shift, 64x64" in text and len(text.splitlines()) == 41  # the dataset's resolution
    run(data, tmp_path / "o", "--show_timesteps", "image")
    assert Image.open(tmp_path / "o" / "timesteps.png").size == (840, 320)


# options of the training scripts ------------------------------------------------------------------------------------

def test_training_options_from_musubi(tmp_path, data):
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark)
    try:
        r = run(data, tmp_path / "o", "--scale_weight_norms", "0.05", "--network_dim", "4", "--network_alpha", "4",
                "--learning_rate", "0.2", "--save_precision", "fp32", "--use_pinned_memory_for_block_swap",
                "--cuda_allow_tf32", "--cuda_cudnn_benchmark", "--log_tracker_name", "my_project", "--log_config",
                "--ddp_timeout", "30", "--compile_dynamic", "auto", "--metadata_title", "My LoRA", "--metadata_author",
                "me", "--metadata_tags", "a,b", "--metadata_reso", "64,64", "--lr_scheduler", "rex", steps=4)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.benchmark
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark = before
    sd = load_file(str(r["final"]))
    assert all(v.dtype == torch.float32 for v in sd.values())
    norms = [((sd[k.replace("lora_down", "lora_up")] @ sd[k]) * sd[k.replace("lora_down.weight", "alpha")] / 4).norm()
             for k in sd if k.endswith("lora_down.weight")]
    assert max(norms) <= 0.05 + 1e-5  # --scale_weight_norms caps every module's delta norm
    assert (r["logging_dir"] / "my_project").is_dir()
    with safe_open(str(r["final"]), "pt") as f:
        md = f.metadata()
    assert md["modelspec.sai_model_spec"] == "1.0.0" and md["modelspec.architecture"] == "Qwen-Image/lora"
    assert md["modelspec.title"] == "My LoRA" and md["modelspec.author"] == "me" and md["modelspec.tags"] == "a,b"
    assert md["modelspec.resolution"] == "64x64" and md["modelspec.implementation"] == "https://github.com/QwenLM/Qwen-Image"
    assert md["ss_base_model_version"] == "qwen_image" and md["ss_lr_scheduler"] == "rex"


def test_kohya_model_hashes_and_no_metadata(tmp_path, data):
    import hashlib

    from safetensors.torch import save

    r = run(data, tmp_path / "o", "--no_metadata", "--network_args", "rank_dropout=0.1", steps=1)
    with safe_open(str(r["final"]), "pt") as f:
        md = f.metadata()
    assert {k for k in md if k.startswith("ss_")} == {"ss_base_model_version", "ss_network_module", "ss_network_dim",
                                                      "ss_network_alpha", "ss_network_args"}
    assert "modelspec.architecture" in md
    # the definition: sha256 of the tensor bytes of the file serialised with only the ss_* metadata; legacy: 64 KiB at
    # 1 MiB
    blob = save(load_file(str(r["final"])), {k: v for k, v in md.items() if k.startswith("ss_")})
    n = int.from_bytes(blob[:8], "little")
    assert md["sshs_model_hash"] == hashlib.sha256(blob[8 + n:]).hexdigest()
    assert md["sshs_legacy_hash"] == hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]


@pytest.mark.parametrize("version,arch", [("edit-2509", "Qwen-Image-Edit-Plus/lora"),
                                          ("layered", "Qwen-Image-Layered/lora")])
def test_modelspec_architecture_per_version(tmp_path, version, arch):
    from musubi_tuner.training.metadata import modelspec

    import argparse
    args = argparse.Namespace(metadata_arch=None, metadata_title=None, output_name="x", metadata_reso=None,
                              metadata_author=None, metadata_description=None, metadata_license=None,
                              metadata_tags=None, min_timestep=0.0, max_timestep=1000.0)
    md = modelspec(args, VERSIONS[version], True, (1024, 1024))
    assert md["modelspec.architecture"] == arch and md["modelspec.resolution"] == "1024x1024"
    assert md["modelspec.implementation"].endswith("Qwen-Image-Layered" if version == "layered" else "Qwen-Image")


def test_state_pruning_separately_from_weights(tmp_path, data):
    out = tmp_path / "o"
    run(data, out, "--save_every_n_steps", "1", "--save_state", "--save_last_n_steps", "3",
        "--save_last_n_steps_state", "1", steps=5)
    names = {p.name for p in out.iterdir()}
    assert {"lora-step00000002.safetensors", "lora-step00000003.safetensors", "lora-step00000004.safetensors"} <= names
    assert "lora-step00000004-state" in names and "lora-step00000003-state" not in names


def test_edit_2511_marker_both_ways(tmp_path):
    from layouts import write_single

    from musubi_tuner.qwen_image.dit import load_dit
    from musubi_tuner.qwen_image.model_files import COMFY_DIT_PREFIX, ZERO_COND_MARKER
    from musubi_tuner.qwen_image.tiny import tiny_dit

    ref = tiny_dit(VERSIONS["edit-2511"])
    path = write_single(ref.state_dict(), tmp_path / "comfy2511.safetensors", prefix=COMFY_DIT_PREFIX,
                        extra={COMFY_DIT_PREFIX + ZERO_COND_MARKER: torch.tensor([])})
    assert load_dit(path, VERSIONS["edit-2511"], torch.float32).config.zero_cond_t
    models, toml = make_cached_dataset(tmp_path / "d", "edit-2511", n=2, batch_size=1)
    r = full_main(train_args(models, toml, tmp_path / "full", "edit-2511", "--max_train_steps", "1",
                             "--learning_rate", "1e-4"))
    assert ZERO_COND_MARKER in load_file(str(r["final"]))
    assert load_dit(r["final"], VERSIONS["edit-2511"], torch.float32) is not None


# options of generation and caching -------------------------------------------------------------------------------

def gen(models, out, *extra):
    return generate_main(["--dit", str(models["dit"]), "--vae", str(models["vae"]), "--text_encoder",
                          str(models["text_encoder"]), "--prompt", "x", "--image_size", "64", "64", "--infer_steps",
                          "2", "--seed", "5", "--device", "cpu", "--save_path", str(out), "--output_type", "latent",
                          *extra])


def test_generation_options_from_musubi(tmp_path, data, monkeypatch):
    models, _ = data
    lora = run(data, tmp_path / "o", "--learning_rate", "5e-2", steps=3)["final"]

    def latent(paths):
        return load_file(str(paths[0]))["latent"]

    base = latent(gen(models, tmp_path / "a"))
    with_lora = latent(gen(models, tmp_path / "b", "--lora_weight", str(lora)))
    merged = generate_main(["--dit", str(models["dit"]), "--lora_weight", str(lora), "--save_merged_model",
                            str(tmp_path / "merged.safetensors")])[0]
    from_merged = latent(gen({**models, "dit": merged}, tmp_path / "c"))
    assert (with_lora - base).abs().max() > 1e-4 and torch.allclose(with_lora, from_merged, atol=1e-4)
    nothing = latent(gen(models, tmp_path / "d", "--lora_weight", str(lora), "--exclude_patterns", "transformer_blocks"))
    attn_only = latent(gen(models, tmp_path / "e", "--lora_weight", str(lora), "--include_patterns", "attn"))
    assert torch.equal(nothing, base) and not torch.equal(attn_only, base) and not torch.equal(attn_only, with_lora)
    fp8 = latent(gen(models, tmp_path / "f", "--fp8"))
    assert 0 < (fp8 - base).abs().mean() < 0.1 * base.abs().mean()
    # a LoRA with fp8 weights is merged before quantisation: the same weights, bit for bit, as quantising the merged
    # model (the outputs agree to float rounding: weights kept as views of the two files lie at different alignments,
    # which CPU matmul kernels may round differently)
    from musubi_tuner.qwen_image.dit import LoraMerge, load_dit
    from musubi_tuner.models.registry import VERSIONS

    fp8 = dict(version=VERSIONS["original"], dtype=torch.float32, fp8_mode="channel")
    streamed = load_dit(models["dit"], loras=[LoraMerge(str(lora), 1.0)], **fp8).state_dict()
    quantised = load_dit(merged, **fp8).state_dict()
    assert streamed.keys() == quantised.keys()
    assert all(torch.equal(streamed[k].view(torch.uint8), quantised[k].view(torch.uint8)) for k in streamed)
    lora_fp8 = latent(gen(models, tmp_path / "g", "--fp8_scaled", "--lora_weight", str(lora)))
    merged_fp8 = latent(gen({**models, "dit": merged}, tmp_path / "h", "--fp8_scaled"))
    assert torch.allclose(lora_fp8, merged_fp8, atol=1e-3) and (
        lora_fp8 - latent(gen(models, tmp_path / "j", "--fp8_scaled"))).abs().max() > 1e-3
    from conftest import console_input

    console_input(monkeypatch, ["a red circle --w 32 --h 32 --d 1", "", "--w 60 broken", "a blue square --d 2"])
    out = generate_main(["--dit", str(models["dit"]), "--vae", str(models["vae"]), "--text_encoder",
                         str(models["text_encoder"]), "--interactive", "--infer_steps", "2", "--device", "cpu",
                         "--save_path", str(tmp_path / "i")])
    assert len(out) == 2 and Image.open(out[0]).size == (32, 32)


def test_caching_num_workers_and_debug_mode(tmp_path, capsys):
    models, toml = make_cached_dataset(tmp_path, "edit-2509", n=3, batch_size=1)
    cache = tmp_path / "cache"
    before = {f.name: load_file(str(f)) for f in cache.glob("*.safetensors")}
    shutil.rmtree(cache)
    common = ["--dataset_config", str(toml), "--model_version", "edit-2509", "--device", "cpu", "--num_workers", "3"]
    cache_latents_main(common + ["--vae", str(models["vae"])])
    cache_te_main(common + ["--text_encoder", str(models["text_encoder"])])
    after = {f.name: load_file(str(f)) for f in cache.glob("*.safetensors")}
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n][k], after[n][k]) for n in before for k in before[n])
    capsys.readouterr()
    r = cache_latents_main(["--dataset_config", str(toml), "--model_version", "edit-2509", "--debug_mode", "image"])
    text = capsys.readouterr().out
    assert r["shown"] == 3 and "bucket 64x64" in text and "controls" in text
    assert len(r["written"]) == 9 and all(p.parent == cache / "debug" for p in r["written"])
    # video: musubi-tuner saves each image item as <cache path>.jpg (its save_video on an image)
    r = cache_latents_main(["--dataset_config", str(toml), "--model_version", "edit-2509", "--debug_mode", "video"])
    caches = sorted(p for p in cache.glob("*_qi*.safetensors") if not p.name.endswith("_te.safetensors"))
    assert sorted(r["written"]) == sorted(p.with_suffix(".jpg") for p in caches) and len(caches) == 3
    assert Image.open(r["written"][0]).size == (64, 64)


# musubi-tuner options beyond the user guide (its shared parsers) ------------------------------------------------------

def test_musubi_dynamo_options_become_compile_options(tmp_path, data, capsys):
    """musubi-tuner's --dynamo_* (accelerate's dynamo plugin) select the same torch.compile settings as --compile_*;
    the default NO compiles nothing; an unknown backend is one error line naming --dynamo_backend."""
    from musubi_tuner import cli_options as opts
    from musubi_tuner.qwen_image_train_network import build_parser

    assert not opts.parse_args(build_parser(), []).compile
    a = opts.parse_args(build_parser(), ["--dynamo_backend", "inductor", "--dynamo_mode", "max-autotune",
                                         "--dynamo_fullgraph", "--dynamo_dynamic"])
    assert (a.compile, a.compile_backend, a.compile_mode, a.compile_fullgraph, a.compile_dynamic) == \
        (True, "inductor", "max-autotune", True, "true")
    a = opts.parse_args(build_parser(), ["--dynamo_backend", "AOT_EAGER", "--compile_mode", "default"])
    assert (a.compile, a.compile_backend, a.compile_mode, a.compile_fullgraph) == (True, "aot_eager", "default", False)
    cfg = tmp_path / "config.toml"  # as a musubi-tuner config file holds them
    cfg.write_text('dynamo_backend = "no"\nimg_in_txt_in_offloading = false\nguidance_scale = 1.0\n')
    a = opts.parse_args(build_parser(), ["--config_file", str(cfg)])
    assert (a.compile, a.img_in_txt_in_offloading, a.guidance_scale) == (False, False, 1.0)
    with pytest.raises(SystemExit):
        run(data, tmp_path / "x", "--dynamo_backend", "NOPE")
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(err) == 1 and "--dynamo_backend NOPE" in err[0] and "INDUCTOR" in err[0]


def test_musubi_tracker_options(tmp_path, data, capsys):
    """--log_tracker_config's tables become the trackers' init options (here TensorBoard's file suffix);
    a bad file, and wandb options without wandb, are one error line before any model loads."""
    import importlib.util

    cfg = tmp_path / "trackers.toml"
    cfg.write_text('[tensorboard]\nfilename_suffix = ".mytag"\n')
    r = run(data, tmp_path / "o", "--log_tracker_config", str(cfg), "--log_tracker_name", "proj", steps=1)
    events = list((r["logging_dir"] / "proj").glob("events.out.tfevents.*"))
    assert events and all(e.name.endswith(".mytag") for e in events)
    bad = tmp_path / "bad.toml"
    cases = [(["--log_tracker_config", str(bad)], "must be a table")]
    bad.write_text('entity = "me"\n')
    broken = tmp_path / "broken.toml"
    broken.write_text("[wandb\n")
    cases.append((["--log_tracker_config", str(broken)], "invalid TOML"))
    if importlib.util.find_spec("wandb") is None:
        cases.append((["--log_with", "wandb", "--wandb_api_key", "k"], "wandb package is not installed"))
    cases.append((["--wandb_api_key", "k"], "needs --log_with wandb"))
    for extra, words in cases:
        with pytest.raises(SystemExit):
            run(data, tmp_path / "x", *extra)
        err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
        assert len(err) == 1 and words in err[0], err
        assert not (tmp_path / "x").exists()


def test_musubi_num_layers_vae_dtype_and_inert_options(tmp_path, data, monkeypatch, caplog, capsys):
    """--num_layers must match the DiT's block count (musubi-tuner loads strictly); --vae_dtype sets the sampling
    VAE's dtype; HunyuanVideo-only options are accepted with a warning and change nothing."""
    from musubi_tuner.qwen_image import vae

    models, _ = data
    blocks = len({k.split(".")[1] for k in load_file(str(models["dit"])) if k.startswith("transformer_blocks.")})
    dtypes = []
    real = vae.load_vae
    monkeypatch.setattr(vae, "load_vae", lambda path, dtype, *a: dtypes.append(dtype) or real(path, dtype, *a))
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle --w 32 --h 32 --s 2\n")
    plain = run(data, tmp_path / "a", "--learning_rate", "0", steps=1)
    inert = run(data, tmp_path / "b", "--learning_rate", "0", "--num_layers", str(blocks), "--vae_dtype", "bfloat16",
                "--sample_prompts", str(prompts), "--sample_at_first", "--img_in_txt_in_offloading",
                "--guidance_scale", "3.5", "--block_swap_h2d_only", "--block_swap_ring_size", "2", steps=1)
    assert dtypes == [torch.bfloat16]
    assert "--img_in_txt_in_offloading has no effect" in caplog.text and "--guidance_scale has no effect" in caplog.text
    a, b = load_file(str(plain["final"])), load_file(str(inert["final"]))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run(data, tmp_path / "c", "--num_layers", str(blocks + 1))
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(err) == 1 and f"has {blocks} blocks" in err[0] and "--num_layers" in err[0]
    with pytest.raises(SystemExit):
        gen(models, tmp_path / "d", "--num_layers", "99")
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(err) == 1 and f"has {blocks} blocks" in err[0]


def test_musubi_generation_no_metadata_bell_and_inert_options(tmp_path, data, capsys, caplog):
    """--no_metadata writes the PNG and the latent file without the prompt and settings; --bell rings once at the
    end; --lycoris and --embedded_cfg_scale are accepted (LoHa/LoKr need no LyCORIS here) and change nothing."""
    models, _ = data
    with_md = gen(models, tmp_path / "a", "--output_type", "latent_images", "--num_layers", "2")
    capsys.readouterr()
    bare = gen(models, tmp_path / "b", "--output_type", "latent_images", "--no_metadata", "--bell", "--lycoris",
               "--embedded_cfg_scale", "2.5")
    assert capsys.readouterr().out.count("\a") == 1
    assert "--lycoris has no effect" in caplog.text and "--embedded_cfg_scale has no effect" in caplog.text
    png = {p.suffix: p for p in with_md}, {p.suffix: p for p in bare}
    assert Image.open(png[0][".png"]).text["prompt"] == "x" and not Image.open(png[1][".png"]).text
    with safe_open(str(png[0][".safetensors"]), "pt") as f, safe_open(str(png[1][".safetensors"]), "pt") as g:
        assert f.metadata()["prompt"] == "x" and not g.metadata()
    assert torch.equal(load_file(str(png[0][".safetensors"]))["latent"], load_file(str(png[1][".safetensors"]))["latent"])


def test_musubi_latent_caching_options(tmp_path, monkeypatch, capsys, caplog):
    """qwen_image_cache_latents.py takes musubi-tuner's shared VAE options: --vae_tiling tiles, --disable_cudnn_backend
    turns cuDNN off, --vae_dtype is refused as there, the HunyuanVideo and console options warn and change nothing."""
    models, toml = make_cached_dataset(tmp_path, "original", n=2, batch_size=1)
    cache = tmp_path / "cache"
    before = {f.name: load_file(str(f)) for f in cache.glob("*_qi.safetensors")}
    monkeypatch.setattr(torch.backends.cudnn, "enabled", True)
    common = ["--dataset_config", str(toml), "--device", "cpu", "--vae", str(models["vae"])]
    cache_latents_main(common + ["--vae_tiling", "--disable_cudnn_backend", "--vae_chunk_size", "32",
                                 "--console_width", "100"])
    assert not torch.backends.cudnn.enabled
    from musubi_tuner.qwen_image_cache_latents import build_parser

    assert build_parser().parse_args(common + ["--vae_tiling"]).vae_enable_tiling
    assert "--vae_chunk_size has no effect" in caplog.text and "--console_width has no effect" in caplog.text
    after = {f.name: load_file(str(f)) for f in cache.glob("*_qi.safetensors")}
    assert before.keys() == after.keys() and all(torch.allclose(before[n][k], after[n][k], atol=1e-5)
                                                  for n in before for k in before[n])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cache_latents_main(common + ["--vae_dtype", "float16"])
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert len(err) == 1 and "--vae_dtype" in err[0]


class FakeHub:
    """huggingface_hub's HfApi calls the trainer makes, against a folder (the Hub cannot be reached here): what is
    uploaded lands in root/<repo_id>/<path_in_repo>, and snapshot_download hands that folder back."""

    root: Path
    calls: list
    fail = False

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, repo_type="model", exist_ok=False, private=False):
        FakeHub.calls.append(("create_repo", repo_id, repo_type, private))

    def upload_file(self, path_or_fileobj, repo_id, repo_type, path_in_repo):
        if FakeHub.fail:
            raise ConnectionError("hub unreachable")
        FakeHub.calls.append(("upload_file", path_in_repo))
        dest = FakeHub.root / repo_id / path_in_repo
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path_or_fileobj, dest)

    def upload_folder(self, folder_path, repo_id, repo_type, path_in_repo):
        FakeHub.calls.append(("upload_folder", path_in_repo))
        shutil.copytree(folder_path, FakeHub.root / repo_id / path_in_repo, dirs_exist_ok=True)

    @staticmethod
    def snapshot_download(repo_id, repo_type="model", revision=None, token=None, allow_patterns=None):
        FakeHub.calls.append(("snapshot_download", repo_id, revision, repo_type, tuple(allow_patterns)))
        return str(FakeHub.root / repo_id)


def test_huggingface_upload_and_resume(tmp_path, data, monkeypatch, capsys, caplog):
    """musubi-tuner's Hub options: every checkpoint (and with --save_state_to_huggingface every state) is uploaded to
    --huggingface_repo_id under --huggingface_path_in_repo, in the background with --async_upload; a run resumed from
    the uploaded state (--resume REPO/PATH:REVISION:TYPE --resume_from_huggingface) ends with the same weights as the
    uninterrupted run; a failed upload is logged and the run still finishes; bad combinations are refused up front."""
    import huggingface_hub

    FakeHub.root, FakeHub.calls = tmp_path / "hub", []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub.snapshot_download)
    hub = ["--huggingface_repo_id", "me/lora", "--huggingface_path_in_repo", "runs/a", "--async_upload"]
    full = run(data, tmp_path / "a", "--save_every_n_steps", "2", "--save_state", "--save_state_to_huggingface", *hub,
               steps=4)
    repo = FakeHub.root / "me/lora/runs/a"
    assert sorted(p.name for p in repo.iterdir()) == ["lora-state", "lora-step00000002-state",
                                                      "lora-step00000002.safetensors", "lora.safetensors"]
    assert ("create_repo", "me/lora", "model", True) in FakeHub.calls
    assert (repo / "lora.safetensors").read_bytes() == full["final"].read_bytes()
    resumed = run(data, tmp_path / "b", "--resume", "me/lora/runs/a/lora-step00000002-state:main:model",
                  "--resume_from_huggingface", steps=4)
    assert ("snapshot_download", "me/lora", "main", "model", ("runs/a/lora-step00000002-state/*",)) in FakeHub.calls
    assert len(resumed["losses"]) == 2 and len(full["losses"]) == 4  # it trained steps 3 and 4 only
    a, b = load_file(str(full["final"])), load_file(str(resumed["final"]))
    assert all(torch.equal(a[k], b[k]) for k in a)

    FakeHub.fail = True
    try:
        r = run(data, tmp_path / "c", "--huggingface_repo_id", "me/other", steps=1)
    finally:
        FakeHub.fail = False
    assert r["final"].is_file() and "upload of lora.safetensors to me/other failed" in caplog.text
    for extra, words in ((["--save_state_to_huggingface"], "needs --huggingface_repo_id"),
                         (["--huggingface_repo_id", "no-slash"], "user/name"),
                         (["--resume_from_huggingface", "--resume", "me/lora"], "REPO_ID/PATH")):
        capsys.readouterr()
        with pytest.raises(SystemExit):
            run(data, tmp_path / "d", *extra)
        err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
        assert len(err) == 1 and words in err[0], err


def _phi(x: float) -> float:
    import math

    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _logit(p: float) -> float:
    import math

    return math.log(p / (1 - p))


@pytest.mark.parametrize("method", ["flux_shift", "flux2_shift", "krea2_shift", "qwen_shift", "ideogram4_shift",
                                    "qinglong_flux"])
def test_musubi_timestep_modes_follow_their_formulas(method):
    """Each of musubi-tuner's timestep modes: the empirical CDF of 200k draws against the CDF of its formula (written
    here from musubi-tuner's trainer: mu lines on the packed token count N, shift exp(mu), the qinglong shares)."""
    import math

    from musubi_tuner.training.timesteps import sample_t

    n_tokens, scale = 1024, 1.3  # a 512x512 image: latent 64x64, 1024 packed tokens
    lines = {"flux_shift": (n_tokens, 256, 0.5, 4096, 1.15), "flux2_shift": (4 * n_tokens, 256, 0.5, 4096, 1.15),
             "krea2_shift": (n_tokens, 256, 0.5, 6400, 1.15), "qwen_shift": (n_tokens, 256, 0.5, 8192, 0.9),
             "qinglong_flux": (n_tokens, 256, 0.5, 4096, 1.15)}

    def shifted_cdf(e: float, key: str) -> float:
        x, x1, y1, x2, y2 = lines[key]
        k = math.exp(y1 + (y2 - y1) / (x2 - x1) * (x - x1))
        base = e / (k - (k - 1) * e)  # the inverse of t -> k t / (1 + (k - 1) t)
        return _phi(_logit(base) / scale)

    def logsnr_cdf(e: float, mean: float, std: float) -> float:
        return 1 - _phi((-2 * _logit(e) - mean) / std)

    def cdf(e: float) -> float:
        if method == "ideogram4_shift":
            return _phi((_logit(e) - 0.5 * math.log(1024 * n_tokens / 512 ** 2)) / 1.5)
        if method == "qinglong_flux":
            return 0.79 * shifted_cdf(e, method) + 0.11 * logsnr_cdf(e, -0.4, 1.2) + 0.10 * logsnr_cdf(e, 5.36, 1.0)
        return shifted_cdf(e, method)

    t = sample_t(method, 200_000, torch.Generator().manual_seed(0), sigmoid_scale=scale, logit_mean=-0.4,
                 logit_std=1.2, image_seq_len=n_tokens)
    assert t.min() >= 0 and t.max() <= 1
    for edge in (0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 0.97):
        assert abs(float((t < edge).float().mean()) - cdf(edge)) < 4e-3, (method, edge)


def test_every_musubi_timestep_mode_is_accepted():
    from musubi_tuner.qwen_image_train_network import build_parser

    action = next(a for a in build_parser()._actions if a.dest == "timestep_sampling")
    musubi = {"sigma", "uniform", "sigmoid", "shift", "flux_shift", "flux2_shift", "ideogram4_shift", "qwen_shift",
              "krea2_shift", "logsnr", "qinglong_flux", "qinglong_qwen"}  # musubi-tuner's parser_common choices
    assert musubi <= set(action.choices)


def test_network_args_metadata_training_without_vae_and_full_finetune_network_options(tmp_path, data, caplog):
    """musubi-tuner: ss_network_args is json.dumps of each `key=value` split at '=' with the value as given; training
    without sample prompts needs no --vae / --text_encoder; its full-finetune parser accepts the network options."""
    models, toml = data
    argv = train_args(models, toml, tmp_path / "o", "original", "--max_train_steps", "1", "--network_args",
                      "rank_dropout=0.10", "exclude_patterns=['.*img_mod.*']", "verbose=True")
    argv = [a for a in argv if a not in ("--vae", str(models["vae"]), "--text_encoder", str(models["text_encoder"]))]
    r = train_main(argv)
    with safe_open(str(r["final"]), "pt") as f:
        md = f.metadata()
    assert md["ss_network_args"] == json.dumps({"rank_dropout": "0.10", "exclude_patterns": "['.*img_mod.*']",
                                                "verbose": "True"})
    assert "ss_vae_name" not in md
    with pytest.raises(SystemExit):
        train_main(argv + ["--sample_prompts", str(tmp_path / "p.txt"), "--output_name", "b"])
    caplog.clear()
    full = full_main(train_args(models, toml, tmp_path / "full", "original", "--max_train_steps", "1",
                                "--optimizer_type", "adafactor", "--network_module", "networks.lora_qwen_image",
                                "--network_dim", "8", "--network_alpha", "4", "--network_dropout", "0.1",
                                "--network_args", "a=1", "--dim_from_weights"))
    assert full["steps"] == 1
    assert "--network_dim has no effect here" in caplog.text and "--dim_from_weights has no effect here" in caplog.text


def test_generation_list_options_take_zero_values(tmp_path, data):
    """musubi-tuner's generation parser takes --lora_weight, --lora_multiplier, --control_image_path and
    --latent_path with nargs='*': given empty, they change nothing."""
    models, _ = data
    common = ["--dit", str(models["dit"]), "--vae", str(models["vae"]), "--text_encoder", str(models["text_encoder"]),
              "--prompt", "x", "--image_size", "64", "64", "--infer_steps", "2", "--seed", "1", "--device", "cpu",
              "--output_type", "latent"]
    plain = generate_main(common + ["--save_path", str(tmp_path / "a")])
    empty = generate_main(common + ["--save_path", str(tmp_path / "b"), "--lora_weight", "--lora_multiplier",
                                    "--control_image_path", "--latent_path"])
    assert torch.equal(load_file(str(plain[0]))["latent"], load_file(str(empty[0]))["latent"])
