"""musubi-tuner's companion tools: post-hoc EMA of LoRA checkpoints."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from musubi_tuner.lora_post_hoc_ema import main as ema_main


def _checkpoints(folder, n=4, seed=0):
    """n kohya LoRA files of one run (bf16 weights, float32 alpha, ss_* metadata), oldest first by mtime."""
    g = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(n):
        sd = {"lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight": torch.randn(4, 64, generator=g).bfloat16(),
              "lora_unet_transformer_blocks_0_attn_to_q.lora_up.weight": torch.randn(64, 4, generator=g).bfloat16(),
              "lora_unet_transformer_blocks_0_attn_to_q.alpha": torch.tensor(4.0)}
        p = folder / f"lora-step{(n - i) * 100:08d}.safetensors"  # names in the opposite order of their times
        save_file(sd, str(p), metadata={"ss_network_dim": "4", "ss_steps": str(i)})
        os.utime(p, (1_000_000 + i, 1_000_000 + i))
        paths.append(p)
    return paths


def _musubi_formula(paths, beta, beta2, sigma_rel):
    """musubi-tuner's lora_post_hoc_ema.merge_lora_weights_with_post_hoc_ema, written out from its code."""
    sds = [load_file(str(p)) for p in sorted(paths, key=os.path.getmtime)]
    state = {k: v.float() for k, v in sds[0].items()}
    count = len(sds) - 1
    for i, sd in enumerate(sds[1:]):
        if sigma_rel is not None:
            t = sigma_rel ** -2
            roots = np.roots([1, 7, 16 - t, 12 - t])
            gamma = roots[np.isreal(roots) & (roots.real >= 0)].real.max()
            b = (1 - 1 / (i + 1)) ** (gamma + 1)
        else:
            b = beta + (beta2 - beta) * (i / (count - 1)) if count > 1 else beta
        for k, v in sd.items():
            if not k.endswith(".alpha"):
                state[k] = state[k] * b + v.float() * (1 - b)
    return {k: v.to(sds[0][k].dtype) for k, v in state.items()}


@pytest.mark.parametrize("extra,beta,beta2,sigma_rel", [([], 0.95, 0.95, None),
                                                        (["--beta", "0.9", "--beta2", "0.99"], 0.9, 0.99, None),
                                                        (["--sigma_rel", "0.2"], 0.95, 0.95, 0.2)])
def test_post_hoc_ema_equals_musubis_formula(tmp_path, extra, beta, beta2, sigma_rel):
    paths = _checkpoints(tmp_path)
    out = tmp_path / "ema.safetensors"
    ema_main([*map(str, reversed(paths)), *extra, "--output_file", str(out)])  # order given: newest first
    got, want = load_file(str(out)), _musubi_formula(paths, beta, beta2, sigma_rel)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert got["lora_unet_transformer_blocks_0_attn_to_q.lora_up.weight"].dtype == torch.bfloat16
    with safe_open(str(out), "pt") as f:
        md = f.metadata()
    from musubi_tuner.networks.lora_files import safetensors_hashes

    assert md["ss_steps"] == "3"  # the newest file's metadata
    assert (md["sshs_model_hash"], md["sshs_legacy_hash"]) == safetensors_hashes(got, md)
    assert json.loads(md["post_hoc_ema"])["files"][0] == paths[0].name


def test_post_hoc_ema_no_sort_and_errors(tmp_path, capsys):
    paths = _checkpoints(tmp_path, n=3)
    out = tmp_path / "ema.safetensors"
    ema_main([str(paths[2]), str(paths[0]), str(paths[1]), "--no_sort", "--beta", "0.5", "--output_file", str(out)])
    a, b, c = (load_file(str(p)) for p in (paths[2], paths[0], paths[1]))
    k = "lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight"
    want = ((a[k].float() * 0.5 + b[k].float() * 0.5) * 0.5 + c[k].float() * 0.5).bfloat16()
    assert torch.equal(load_file(str(out))[k], want)
    capsys.readouterr()
    other = tmp_path / "other.safetensors"
    sd = load_file(str(paths[0]))
    sd["lora_unet_transformer_blocks_0_attn_to_q.alpha"] = torch.tensor(8.0)
    save_file(sd, str(other))
    for argv, words in (([str(paths[0]), "--output_file", str(out)], "at least two"),
                        ([*map(str, paths), "--beta", "1.5", "--output_file", str(out)], "--beta 1.5"),
                        ([*map(str, paths), "--sigma_rel", "5", "--output_file", str(out)], "--sigma_rel 5"),
                        ([*map(str, paths), "--output_file", str(tmp_path / "x.txt")], ".safetensors"),
                        ([*map(str, paths), "--output_file", str(paths[0])], "one of the input files"),
                        ([str(paths[0]), str(other), "--output_file", str(out)], "alpha differs")):
        with pytest.raises(SystemExit):
            ema_main(argv)
        err = capsys.readouterr().err
        assert err.startswith("error:") and words in err and "Traceback" not in err, err


# merge_lora.py -------------------------------------------------------------------------------------------------------

def _lora_for(model, path, scale=0.05, seed=1):
    """A kohya LoRA file with random non-zero factors on every attention projection of the model's blocks."""
    from musubi_tuner.networks.lora_files import LoraWeights, to_kohya

    g = torch.Generator().manual_seed(seed)
    loras = {}
    for name, mod in model.named_modules():
        if name.startswith("transformer_blocks.") and name.endswith(("to_q", "to_k", "to_v")):
            loras[name] = LoraWeights(torch.randn(4, mod.in_features, generator=g) * scale,
                                      torch.randn(mod.out_features, 4, generator=g) * scale, 4.0)
    save_file(to_kohya(loras), str(path))
    return path


def test_merge_lora_keeps_the_layout_and_equals_generating_with_the_lora(tmp_path, tiny_models, capsys):
    from diffusers import QwenImageTransformer2DModel
    from layouts import write_sharded

    from musubi_tuner.merge_lora import main as merge_main
    from musubi_tuner.qwen_image.dit import LoraMerge, load_dit
    from musubi_tuner.models.registry import VERSIONS
    from musubi_tuner.qwen_image_generate_image import main as generate_main

    v = VERSIONS["original"]
    base = load_dit(tiny_models["dit"], v, torch.float32)
    a, b = _lora_for(base, tmp_path / "a.safetensors"), _lora_for(base, tmp_path / "b.safetensors", seed=2)
    want = load_dit(tiny_models["dit"], v, torch.float32,
                    loras=[LoraMerge(str(a), 1.0), LoraMerge(str(b), 0.5)]).state_dict()
    # a single file stays a single file with the input's key names
    out = tmp_path / "merged.safetensors"
    merge_main(["--dit", str(tiny_models["dit"]), "--lora_weight", str(a), str(b), "--lora_multiplier", "1.0", "0.5",
                "--save_merged_model", str(out)])
    with safe_open(str(tiny_models["dit"]), "pt") as f:
        in_keys = set(f.keys())
    got = load_file(str(out))
    assert set(got) == in_keys
    merged = load_dit(out, v, torch.float32).state_dict()
    assert all(torch.equal(merged[k], want[k]) for k in want)
    # generating with the merged file equals generating with the LoRAs on the base
    common = ["--vae", str(tiny_models["vae"]), "--text_encoder", str(tiny_models["text_encoder"]), "--prompt", "x",
              "--image_size", "64", "64", "--infer_steps", "2", "--seed", "5", "--device", "cpu", "--output_type",
              "latent"]
    with_loras = generate_main(["--dit", str(tiny_models["dit"]), "--lora_weight", str(a), str(b),
                                "--lora_multiplier", "1.0", "0.5", "--save_path", str(tmp_path / "g1"), *common])
    from_merged = generate_main(["--dit", str(out), "--save_path", str(tmp_path / "g2"), *common])
    # (the weights are equal bit for bit, above; the outputs to float rounding: tensors kept as views of two different
    # files lie at different alignments, which CPU matmul kernels may round differently)
    lat_a, lat_b = load_file(str(with_loras[0]))["latent"], load_file(str(from_merged[0]))["latent"]
    assert torch.allclose(lat_a, lat_b, atol=1e-5) and (lat_a - lat_b).abs().max() < 1e-5
    # diffusers shards stay shards, in a folder that diffusers' own loader reads
    shards = tmp_path / "shards"
    write_sharded(base.state_dict(), shards, "diffusion_pytorch_model", 2, json.loads(base.to_json_string()))
    folder = tmp_path / "merged_shards"
    merge_main(["--dit", str(shards), "--lora_weight", str(a), "--save_merged_model", str(folder), "--save_precision",
                "bf16"])
    assert len(list(folder.glob("diffusion_pytorch_model-*-of-*.safetensors"))) >= 1
    ref = QwenImageTransformer2DModel.from_pretrained(str(folder))
    ours = load_dit(tiny_models["dit"], v, torch.bfloat16, loras=[LoraMerge(str(a), 1.0)]).state_dict()
    assert all(torch.equal(ref.state_dict()[k], ours[k]) for k in ours)
    # checked before loading: a shards input wants a folder; the output is never the input
    for argv, words in ((["--dit", str(shards), "--save_merged_model", str(tmp_path / "x.safetensors")], "folder"),
                        (["--dit", str(tiny_models["dit"]), "--save_merged_model", str(tiny_models["dit"])],
                         "the DiT file itself"),
                        (["--dit", str(tiny_models["dit"]), "--lora_weight", str(tmp_path / "none.safetensors"),
                          "--save_merged_model", str(tmp_path / "y.safetensors")], "none.safetensors")):
        capsys.readouterr()
        with pytest.raises(SystemExit):
            merge_main(argv)
        err = capsys.readouterr().err
        assert "error:" in err and words in err and "Traceback" not in err, err


# qwen_extract_lora.py ---------------------------------------------------------------------------------------------

def test_extracted_lora_reconstructs_the_finetune(tmp_path, tiny_models, capsys):
    """A 'finetune' = base + a rank-3 change on some Linear weights of the blocks and img_in: extraction at rank >= 3
    recovers it (error ~0, and the LoRA merged into the base gives the finetune's weights); at rank 1 the error is the
    SVD tail's, and musubi-tuner's key names and alpha = rank are written."""
    from musubi_tuner.qwen_extract_lora import main as extract_main
    from musubi_tuner.qwen_image.dit import LoraMerge, load_dit
    from musubi_tuner.qwen_image.model_files import COMFY_DIT_PREFIX
    from musubi_tuner.models.registry import VERSIONS

    v = VERSIONS["original"]
    base = load_dit(tiny_models["dit"], v, torch.float32)
    sd = {k: t.clone() for k, t in base.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    changed = ["transformer_blocks.0.attn.to_q.weight", "transformer_blocks.1.img_mlp.net.2.weight", "img_in.weight"]
    for k in changed:
        out_f, in_f = sd[k].shape
        sd[k] += (torch.randn(out_f, 3, generator=g) @ torch.randn(3, in_f, generator=g)) * 0.01
    tuned = tmp_path / "tuned.safetensors"
    save_file({COMFY_DIT_PREFIX + k: t.contiguous() for k, t in sd.items()}, str(tuned))  # ComfyUI prefix
    full = tmp_path / "rank4.safetensors"
    info = extract_main(["--model_org", str(tiny_models["dit"]), "--model_tuned", str(tuned), "--save_to", str(full),
                         "--dim", "4", "--clamp_quantile", "1"])
    assert info["error"] < 1e-4
    lora = load_file(str(full))
    assert lora["lora_unet_img_in.alpha"].item() == 4 and lora["lora_unet_img_in.lora_up.weight"].shape[1] == 4
    assert "lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight" in lora
    merged = load_dit(tiny_models["dit"], v, torch.float32, loras=[LoraMerge(str(full), 1.0)]).state_dict()
    for k in changed:
        assert torch.allclose(merged[k], sd[k], atol=1e-5), k
    # diffusers' own loader reads the extracted file (kohya names, img_in included) to the same model
    from diffusers import QwenImagePipeline

    ref = load_dit(tiny_models["dit"], v, torch.float32)
    state = QwenImagePipeline.lora_state_dict(str(full))
    ref.load_lora_adapter(state[0] if isinstance(state, tuple) else state, prefix="transformer")
    ours = load_dit(tiny_models["dit"], v, torch.float32, loras=[LoraMerge(str(full), 1.0)])
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 16, 64, generator=g), torch.tensor([0.5])
    txt = torch.randn(1, 7, ref.config.joint_attention_dim, generator=g)
    with torch.no_grad():
        a, b = (m(hidden_states=x, timestep=t, encoder_hidden_states=txt, img_shapes=[[(1, 4, 4)]],
                  return_dict=False)[0] for m in (ref, ours))
    assert torch.allclose(a, b, atol=1e-5)
    plain = tmp_path / "plain.safetensors"
    extract_main(["--model_org", str(tiny_models["dit"]), "--model_tuned", str(tuned), "--save_to", str(plain), "--dim",
                  "2", "--save_precision", "bf16", "--no_metadata"])
    with safe_open(str(plain), "pt") as f:
        assert not f.metadata() and f.get_tensor("lora_unet_img_in.lora_up.weight").dtype == torch.bfloat16
    low = extract_main(["--model_org", str(tiny_models["dit"]), "--model_tuned", str(tuned), "--save_to",
                        str(tmp_path / "rank1.safetensors"), "--dim", "1"])
    assert 0.1 < low["error"] < 1
    with safe_open(str(tmp_path / "rank1.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["extract_relative_error"])["overall"] == round(low["error"], 6)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        extract_main(["--model_org", str(tiny_models["dit"]), "--model_tuned", str(tiny_models["vae"]), "--save_to",
                      str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err
    assert "--model_tuned" in err and "error:" in err and "Traceback" not in err


def test_merge_lora_fp8_scaled_writes_comfyuis_layout(tmp_path, tiny_models, capsys):
    """--fp8_scaled: ComfyUI's scaled fp8 layout as its model_detection and ops.scaled_fp8_ops read it (a
    `<prefix>scaled_fp8` marker of the fp8 dtype, every Linear weight fp8 with a float32 scalar scale_weight, weight =
    fp8 * scale); dequantised, the weights are the merged ones to fp8's precision. This tool refuses fp8 files."""
    from musubi_tuner.merge_lora import main as merge_main
    from musubi_tuner.qwen_image.dit import LoraMerge, load_dit
    from musubi_tuner.qwen_image.model_files import COMFY_DIT_PREFIX
    from musubi_tuner.models.registry import VERSIONS

    v = VERSIONS["original"]
    base = load_dit(tiny_models["dit"], v, torch.float32)
    lora = _lora_for(base, tmp_path / "a.safetensors")
    out = tmp_path / "fp8.safetensors"
    merge_main(["--dit", str(tiny_models["dit"]), "--lora_weight", str(lora), "--save_merged_model", str(out),
                "--fp8_scaled"])
    want = load_dit(tiny_models["dit"], v, torch.float32, loras=[LoraMerge(str(lora), 1.0)]).state_dict()
    with safe_open(str(tiny_models["dit"]), "pt") as f:
        prefix = COMFY_DIT_PREFIX if any(k.startswith(COMFY_DIT_PREFIX) for k in f.keys()) else ""
    got = load_file(str(out))
    marker = got.pop(prefix + "scaled_fp8")
    assert marker.dtype == torch.float8_e4m3fn and marker.numel() == 0
    linear = {f"{n}.weight" for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)}
    for k, w in want.items():
        if k in linear:
            q, scale = got[prefix + k], got[prefix + k[:-6] + "scale_weight"]
            assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.shape == ()
            deq = q.float() * scale
            assert (deq - w).norm() / w.norm() < 0.05, k
        else:
            assert torch.equal(got[prefix + k].float(), w), k
    capsys.readouterr()
    with pytest.raises(SystemExit):
        merge_main(["--dit", str(out), "--save_merged_model", str(tmp_path / "again.safetensors")])
    assert "fp8" in capsys.readouterr().err
