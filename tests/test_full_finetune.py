"""Full finetuning, fused backward Adafactor with stochastic rounding, memory-efficient save, multi-process runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import add_validation_dataset, make_cached_dataset, train_args
from diffusers import QwenImageTransformer2DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers.optimization import Adafactor

from musubi_tuner.fileio import save_safetensors_streaming
from musubi_tuner.qwen_image.dit import load_dit
from musubi_tuner.qwen_image.tiny import TINY_DIT
from musubi_tuner.models.registry import VERSIONS
from musubi_tuner.qwen_image_train import main as full_main
from musubi_tuner.training.full import FusedBackwardStep, stochastic_round_bf16

SRC = Path(__file__).parents[1] / "src" / "musubi_tuner"


def test_stochastic_rounding_is_unbiased():
    x = torch.full((200_000,), 1.0 + 2**-10, dtype=torch.float32)  # between two bf16 neighbours (step 2^-7)
    sr = stochastic_round_bf16(x, torch.Generator().manual_seed(0)).float()
    plain = x.to(torch.bfloat16).float()
    assert abs(sr.mean().item() - x[0].item()) < 2e-5
    assert abs(plain.mean().item() - x[0].item()) > 5e-4  # round-to-nearest always lands on 1.0
    assert set(sr.unique().tolist()) == {1.0, 1.0 + 2**-7}
    neg = stochastic_round_bf16(-x, torch.Generator().manual_seed(1)).float()
    assert abs(neg.mean().item() + x[0].item()) < 2e-5


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))


def test_fused_backward_adafactor_equals_unfused():
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    kw = dict(lr=1e-2, relative_step=False, scale_parameter=False, warmup_init=False)
    a, b = _model(), _model()
    opt_a = Adafactor(a.parameters(), **kw)
    opt_b = Adafactor(b.parameters(), **kw)
    fused = FusedBackwardStep(opt_b, list(b.parameters()))
    for _ in range(5):
        torch.nn.functional.mse_loss(a(x), y).backward()
        opt_a.step()
        opt_a.zero_grad()
        torch.nn.functional.mse_loss(b(x), y).backward()  # the hooks step every parameter
        assert all(p.grad is None for p in b.parameters())
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)
    fused.remove()


def test_fused_backward_bf16_keeps_fp32_state_and_learns():
    m = _model().to(torch.bfloat16)
    opt = Adafactor(m.parameters(), lr=1e-2, relative_step=False, scale_parameter=False, warmup_init=False)
    FusedBackwardStep(opt, list(m.parameters()))
    x, y = torch.randn(64, 8, dtype=torch.bfloat16), torch.randn(64, 4, dtype=torch.bfloat16)
    first = None
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(m(x).float(), y.float())
        first = first or loss.item()
        loss.backward()
    assert loss.item() < 0.9 * first
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    state = opt.state[next(m.parameters())]
    assert state["exp_avg_sq_row"].dtype == torch.float32


def test_mem_eff_save_equals_normal_save(tmp_path):
    sd = {"a.weight": torch.randn(17, 5), "b.bias": torch.randn(3).to(torch.bfloat16), "c": torch.arange(4)}
    save_file({k: (v.to(torch.float16) if v.is_floating_point() else v) for k, v in sd.items()}, str(tmp_path / "n.st"),
              metadata={"x": "1"})
    save_safetensors_streaming(sd, tmp_path / "m.st", {"x": "1"}, torch.float16)
    a, b = load_file(str(tmp_path / "n.st")), load_file(str(tmp_path / "m.st"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    with safe_open(str(tmp_path / "m.st"), "pt") as f:
        assert f.metadata() == {"x": "1"}


@pytest.mark.parametrize("mem_eff", [False, True])
def test_full_finetune_reduces_loss_and_reloads(tmp_path, mem_eff):
    from test_training import fixed_loss

    models, toml = make_cached_dataset(tmp_path, "original", n=2, colours=["red"], batch_size=1)
    extra = ["--mem_eff_save"] if mem_eff else []
    result = full_main(train_args(models, toml, tmp_path / "out", "original", "--max_train_steps", "60",
                                  "--learning_rate", "1e-3", "--optimizer_type", "adafactor", "--fused_backward_pass",
                                  "--max_grad_norm", "0", "--timestep_sampling", "uniform", *extra))
    final = result["final"]
    before, after = fixed_loss(models, toml), fixed_loss({**models, "dit": final}, toml)
    print(f"full finetune fixed-sample loss {before:.4f} -> {after:.4f}")
    assert after < 0.8 * before
    saved = load_file(str(final))
    ours = load_dit(final, VERSIONS["original"], torch.float32)
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in saved.items())  # bit-exact reload
    ref = QwenImageTransformer2DModel(**TINY_DIT)
    ref.load_state_dict(saved, strict=True)  # plain diffusers key layout
    with safe_open(str(final), "pt") as f:
        assert f.metadata()["ss_training_mode"] == "full"


def test_full_finetune_refusals(tmp_path, capsys):
    models, toml = make_cached_dataset(tmp_path, "original", n=2)
    for extra, msg in ((["--fp8_base"], "cannot be used for full finetuning"),
                       (["--optimizer_type", "adafactor", "--fused_backward_pass", "--gradient_accumulation_steps", "2"],
                        "cannot be combined with --gradient_accumulation_steps")):
        with pytest.raises(SystemExit):
            full_main(train_args(models, toml, tmp_path / "o", "original", "--max_train_steps", "1", *extra))
        assert msg in capsys.readouterr().err


def free_port() -> int:
    """A port nobody listens on (tests may run in parallel workers: no fixed rendezvous port)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(script, args, trace, processes):
    env = {**os.environ, "MUSUBI_TUNER_TRACE_DIR": str(trace)}
    if processes == 1:
        cmd = [sys.executable, str(SRC / script), *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--main_process_port", str(free_port()),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SRC / script), *args]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    _launch.stderr = r.stderr
    return [json.loads((trace / f"rank{i}.json").read_text()) for i in range(processes)]


@pytest.mark.parametrize("script,extra", [
    ("qwen_image_train_network.py", ["--network_dim", "4", "--learning_rate", "1e-2"]),
    ("qwen_image_train.py", ["--learning_rate", "1e-3", "--optimizer_type", "adamw"]),
])
def test_two_processes_equal_one_process_with_the_global_batch(tmp_path, script, extra):
    models, toml = make_cached_dataset(tmp_path, "original", n=4, batch_size=1)
    add_validation_dataset(tmp_path, toml, models, "original", n=3)  # 2 + 1 items on the two processes
    extra = [*extra, "--validate_every_n_steps", "2"]
    args = train_args(models, toml, tmp_path / "two", "original", "--max_train_steps", "4", *extra)
    two = _launch(script, args, tmp_path / "t2", 2)
    assert _launch.stderr.count("musubi_tuner.training.trainer: saved ") == 1  # log lines once, from rank 0
    seen0, seen1 = two[0]["items"], two[1]["items"]
    assert all(a != b for a, b in zip(seen0, seen1))  # different samples on each rank at every step
    assert two[0]["checksum"] == two[1]["checksum"]  # identical parameters on both ranks
    toml.write_text(toml.read_text().replace("batch_size = 1", "batch_size = 2"))
    one = _launch(script, train_args(models, toml, tmp_path / "one", "original", "--max_train_steps", "4", *extra),
                  tmp_path / "t1", 1)
    assert [sorted(a + b) for a, b in zip(seen0, seen1)] == [sorted(x) for x in one[0]["items"]]
    a = load_file(str(tmp_path / "two" / "lora.safetensors"))
    b = load_file(str(tmp_path / "one" / "lora.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 2e-4
    assert not (tmp_path / "two" / "lora.safetensors.tmp").exists()
    # the logged loss is the mean over the processes: what one process with the whole global batch logs
    def logged(folder):
        return [float(line.split(",")[2]) for line in (folder / "lora_loss_log.csv").read_text().splitlines()[1:]]

    assert np.allclose(logged(tmp_path / "two"), logged(tmp_path / "one"), atol=2e-4)
    # validation: each process takes its share, the sums are gathered once: the single-process figures
    def validated(folder):
        rows = [line.split(",") for line in (folder / "lora_validation_log.csv").read_text().splitlines()[1:]]
        return [[float(v) for v in row] for row in rows]

    assert len(validated(tmp_path / "two")) == 2
    assert np.allclose(validated(tmp_path / "two"), validated(tmp_path / "one"), atol=2e-4)


def test_fsdp_full_finetune_equals_one_process_and_resumes(tmp_path):
    models, toml = make_cached_dataset(tmp_path, "original", n=4, batch_size=1)
    common = ["--learning_rate", "1e-3", "--optimizer_type", "adamw", "--max_grad_norm", "1.0"]
    fsdp = train_args(models, toml, tmp_path / "fsdp", "original", "--max_train_steps", "4", "--fsdp",
                      "--save_every_n_steps", "2", "--save_state", *common)
    two = _launch("qwen_image_train.py", fsdp, tmp_path / "t2", 2)
    assert two[0]["checksum"] == two[1]["checksum"] and all(a != b for a, b in zip(two[0]["items"], two[1]["items"]))
    state = tmp_path / "fsdp" / "lora-step00000002-state"
    assert (state / "dcp").is_dir() and json.loads((state / "train_state.json").read_text())["global_step"] == 2
    # resume the sharded state from step 2 to step 4: same weights as the uninterrupted FSDP run
    resumed = train_args(models, toml, tmp_path / "resumed", "original", "--max_train_steps", "4", "--fsdp",
                         "--resume", str(state), *common)
    _launch("qwen_image_train.py", resumed, tmp_path / "t3", 2)
    a = load_file(str(tmp_path / "fsdp" / "lora.safetensors"))
    c = load_file(str(tmp_path / "resumed" / "lora.safetensors"))
    assert max((a[k] - c[k]).abs().max().item() for k in a) < 1e-5
    # one process with the global batch
    toml.write_text(toml.read_text().replace("batch_size = 1", "batch_size = 2"))
    _launch("qwen_image_train.py", train_args(models, toml, tmp_path / "one", "original", "--max_train_steps", "4",
                                              *common), tmp_path / "t1", 1)
    b = load_file(str(tmp_path / "one" / "lora.safetensors"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 2e-4
    ref = QwenImageTransformer2DModel(**TINY_DIT)
    ref.load_state_dict(a, strict=True)  # rank 0 wrote full, unsharded weights


def test_fsdp_needs_several_processes(tmp_path, capsys):
    models, toml = make_cached_dataset(tmp_path, "original", n=2)
    with pytest.raises(SystemExit):
        full_main(train_args(models, toml, tmp_path / "o", "original", "--max_train_steps", "1", "--fsdp"))
    assert "--fsdp shards the model across processes" in capsys.readouterr().err


def test_full_finetune_with_block_swap_and_fused_backward(tmp_path):
    models, toml = make_cached_dataset(tmp_path, "original", n=2)
    r = full_main(train_args(models, toml, tmp_path / "o", "original", "--max_train_steps", "2", "--blocks_to_swap",
                             "1", "--optimizer_type", "adafactor", "--fused_backward_pass", "--max_grad_norm", "0",
                             "--learning_rate", "1e-3", "--gradient_checkpointing"))
    assert r["steps"] == 2 and all(torch.isfinite(torch.tensor(r["losses"])))
    assert load_dit(r["final"], VERSIONS["original"], torch.float32) is not None
