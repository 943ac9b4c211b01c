"""Reliability: no lost progress, no code execution from files, no silent wrong results, one clear line per mistake.

Each test reproduces one failure a user or operator hit (see the README's reliability table)."""

import io
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_cached_dataset, train_args
from layouts import write_single
from PIL import Image
from safetensors.torch import load_file, save_file

from musubi_tuner.errors import UserError
from musubi_tuner.networks.lora_files import to_kohya
from musubi_tuner.qwen_image import tiny
from musubi_tuner.qwen_image_generate_image import main as generate_main
from musubi_tuner.qwen_image_train_network import main as train_main
from musubi_tuner.training import trainer as trainer_mod

SRC = Path(__file__).parents[1] / "src" / "musubi_tuner"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Tiny models + 6 cached images, batch size 1 (6 micro-batches per epoch)."""
    return make_cached_dataset(tmp_path_factory.mktemp("rel"), "original", n=6, batch_size=1)


def lora_args(data, out, *extra, steps=5):
    models, toml = data
    return train_args(models, toml, out, "original", "--max_train_steps", str(steps), "--learning_rate", "1e-2",
                      "--network_dim", "4", "--lr_scheduler", "cosine", *extra)


def error_line(capsys, fn, argv, code=2) -> str:
    with pytest.raises(SystemExit) as e:
        fn(argv)
    assert e.value.code == code
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in "\n".join(err)
    return lines[0]


def no_model_loads(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the check")

    for target in ("musubi_tuner.training.trainer.load_dit_with_options", "musubi_tuner.qwen_image.generation.load_text_encoder",
                   "musubi_tuner.generation.pipeline.load_dit_with_options", "musubi_tuner.training.sampling.encode_prompts"):
        monkeypatch.setattr(target, boom)


def assert_same_lora(a: Path, b: Path, atol=1e-6):
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    for k in x:
        assert torch.allclose(x[k], y[k], atol=atol), k


# 1. progress lost mid-run ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("line,words", [("a cat --w 60", ["--w 60", "multiple of 16", "try 64"]),
                                        ("a cat --s 0", ["--s 0", "at least 1"]),
                                        ("a cat --fs -1", ["--fs -1", "> 0"]),
                                        ("a cat --l -2", ["--l -2", ">= 0"])])
def test_bad_sample_prompt_line_is_an_error_before_loading(tmp_path, capsys, monkeypatch, data, line, words):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"fine line --w 64 --h 64\n{line}\n")
    no_model_loads(monkeypatch)
    msg = error_line(capsys, train_main, lora_args(data, tmp_path / "o", "--sample_prompts", str(prompts),
                                                   "--sample_every_n_steps", "1"))
    assert f"{prompts}:2" in msg and all(w in msg for w in words), msg


def test_exception_inside_accumulation_window_saves_the_last_step_and_resumes_exactly(tmp_path, capsys, monkeypatch,
                                                                                    data):
    """An error in the 2nd micro-batch of step 4 (gradient accumulation 2): the state of step 3 is saved, without the
    half-accumulated gradient, and the resumed run equals the uninterrupted one."""
    extra = ["--gradient_accumulation_steps", "2"]
    full = train_main(lora_args(data, tmp_path / "full", *extra))
    real, calls = trainer_mod.flow_matching_loss, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 8:
            raise RuntimeError("No space left on device (simulated)")
        return real(*a, **k)

    monkeypatch.setattr(trainer_mod, "flow_matching_loss", failing)
    line = error_line(capsys, train_main, lora_args(data, tmp_path / "part", *extra), code=1)
    state = tmp_path / "part" / "lora-interrupted-state"
    assert "RuntimeError" in line and "No space left" in line and f"--resume {state}" in line
    assert json.loads((state / "train_state.json").read_text())["global_step"] == 3
    assert (tmp_path / "part" / "lora-interrupted.safetensors").is_file()
    monkeypatch.setattr(trainer_mod, "flow_matching_loss", real)
    resumed = train_main(lora_args(data, tmp_path / "part", *extra, "--resume", str(state)))
    assert resumed["steps"] == 5
    assert_same_lora(full["final"], resumed["final"])
    assert np.allclose(full["losses"][6:], resumed["losses"], atol=1e-6)
    rows = [r["step"] for r in __import__("csv").DictReader(open(resumed["loss_log"]))]
    assert rows == ["1", "2", "3", "4", "5"]  # no repeated or missing rows


def test_sigterm_stops_at_the_step_boundary_and_resumes_exactly(tmp_path, monkeypatch, data):
    full = train_main(lora_args(data, tmp_path / "full"))
    monkeypatch.setattr(trainer_mod, "after_optimizer_step",
                        lambda step: os.kill(os.getpid(), signal.SIGTERM) if step == 3 else None)
    with pytest.raises(SystemExit) as e:
        train_main(lora_args(data, tmp_path / "part"))
    assert e.value.code == 143
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again
    state = tmp_path / "part" / "lora-interrupted-state"
    monkeypatch.setattr(trainer_mod, "after_optimizer_step", lambda step: None)
    resumed = train_main(lora_args(data, tmp_path / "part", "--resume", str(state)))
    assert_same_lora(full["final"], resumed["final"])


def test_sigterm_to_a_real_training_process_with_loader_workers(tmp_path, data):
    """The documented command in a subprocess, with DataLoader workers: SIGTERM ends it with exit 143, the state of
    the last finished step and a LoRA that the generation script loads, and no traceback."""
    out = tmp_path / "o"
    args = lora_args(data, out, steps=100000)
    args[args.index("--max_data_loader_n_workers") + 1] = "2"
    proc = subprocess.Popen([sys.executable, str(SRC / "qwen_image_train_network.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "lora_loss_log.csv"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "Traceback" not in err and "interrupted at step" in err
    step = json.loads((out / "lora-interrupted-state" / "train_state.json").read_text())["global_step"]
    assert int(log.read_text().splitlines()[-1].split(",")[0]) == step >= 2
    models, _ = data
    saved = generate_main(["--dit", str(models["dit"]), "--vae", str(models["vae"]), "--text_encoder",
                           str(models["text_encoder"]), "--prompt", "x", "--image_size", "64", "64", "--infer_steps",
                           "2", "--device", "cpu", "--save_path", str(tmp_path / "g"), "--output_type", "latent",
                           "--lora_weight", str(out / "lora-interrupted.safetensors")])
    assert saved[0].is_file()


def test_nothing_to_save_before_the_first_step(tmp_path, capsys, monkeypatch, data):
    monkeypatch.setattr(trainer_mod, "flow_matching_loss", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(SystemExit) as e:
        train_main(lora_args(data, tmp_path / "o"))
    assert e.value.code == 130
    assert "nothing was saved (no step finished" in capsys.readouterr().err
    assert not (tmp_path / "o" / "lora-interrupted-state").exists()


# 2. no code execution from a state folder -----------------------------------------------------------------------

class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_crafted_pickle_in_a_sharded_state_is_refused(tmp_path):
    from musubi_tuner.training.safe_dcp import SafeLoadPlanner, read_metadata

    marker = tmp_path / "marker.txt"
    payload = pickle.dumps(_Payload(marker))
    pickle.loads(payload)  # the payload is live: plain unpickling runs it
    assert marker.read_text() == "pwned"
    marker.unlink()
    dcp = tmp_path / "lora-state" / "dcp"
    dcp.mkdir(parents=True)
    (dcp / ".metadata").write_bytes(payload)
    with pytest.raises(UserError, match="not a checkpoint metadata file"):
        read_metadata(dcp)
    assert not marker.exists()
    planner = SafeLoadPlanner()
    planner.flatten_state_dict, planner.state_dict = False, {}

    class Item:
        class dest_index:
            fqn = "optim.param_groups.0.lr"

    buf = io.BytesIO()
    torch.save(_Payload(marker), buf)
    buf.seek(0)
    with pytest.raises(UserError, match="not plain data"):
        planner.load_bytes(Item, buf)
    assert not marker.exists()


def test_real_dcp_metadata_still_reads(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from musubi_tuner.training.safe_dcp import SafeLoadPlanner, SafeReader, read_metadata

    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    msd, osd = get_state_dict(model, opt)
    with pytest.warns(UserWarning):
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(tmp_path / "dcp"))
    assert "model.weight" in read_metadata(tmp_path / "dcp").state_dict_metadata
    fresh = torch.nn.Linear(4, 3)
    fopt = torch.optim.AdamW(fresh.parameters())
    fsd, fosd = get_state_dict(fresh, fopt)
    with pytest.warns(UserWarning):
        dcp.load({"model": fsd, "optim": fosd}, storage_reader=SafeReader(str(tmp_path / "dcp")),
                 planner=SafeLoadPlanner())
    assert torch.equal(fsd["weight"], msd["weight"])


# 4. concurrent runs, per-run logs -------------------------------------------------------------------------------

def test_second_run_on_the_same_output_is_refused_and_dead_locks_are_taken_over(tmp_path, capsys, data):
    from musubi_tuner.training.outputs import RunLock

    out = tmp_path / "o"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys; sys.path.insert(0, sys.argv[1]); from musubi_tuner.training.outputs import RunLock; "
        "import time; RunLock(sys.argv[2], 'lora').acquire(); print('locked', flush=True); time.sleep(60)"),
        str(SRC.parent), str(out)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        msg = error_line(capsys, train_main, lora_args(data, out, steps=1))
        assert "is in use by another run" in msg and f"pid {holder.pid}" in msg and "--output_name" in msg
    finally:
        holder.kill()
        holder.wait()
    # the holder died (kill -9): its lock file is still there, and the next run simply takes it over
    assert (out / ".lora.lock").exists()
    train_main(lora_args(data, out, steps=1))
    assert not (out / ".lora.lock").exists()
    # two names in one folder: independent locks and logs
    other = RunLock(out, "other")
    other.acquire()
    other.release()


def test_loss_logs_are_per_run_and_truncated_on_resume(tmp_path, data):
    out = tmp_path / "o"
    a = train_main(lora_args(data, out, "--save_every_n_steps", "2", "--save_state", steps=4))
    b = train_main(lora_args(data, out, "--output_name", "second", steps=2))
    assert a["loss_log"] != b["loss_log"] and len(a["loss_log"].read_text().splitlines()) == 5  # not deleted by b
    # a killed run wrote rows 3 and 4 after its last save (step 2): resuming from step 2 drops them and appends
    state = out / "lora-step00000002-state"
    train_main(lora_args(data, out, "--resume", str(state), steps=4))
    steps = [line.split(",")[0] for line in a["loss_log"].read_text().splitlines()[1:]]
    assert steps == ["1", "2", "3", "4"]


def test_new_run_does_not_overwrite_earlier_results_without_overwrite(tmp_path, capsys, data):
    out = tmp_path / "o"
    first = train_main(lora_args(data, out, steps=1))
    before = first["final"].read_bytes()
    msg = error_line(capsys, train_main, lora_args(data, out, steps=2))
    assert "--overwrite" in msg and "lora.safetensors" in msg
    assert first["final"].read_bytes() == before
    train_main(lora_args(data, out, "--overwrite", steps=2))
    assert first["final"].read_bytes() != before


def test_continuing_to_more_epochs_keeps_the_earlier_final_epoch(tmp_path, data):
    """Resuming a finished 1-epoch run to 2 epochs in the same folder keeps epoch 1's LoRA and state (hard links)."""
    out = tmp_path / "o"
    one = train_main(lora_args(data, out, "--max_train_epochs", "1", "--save_state_on_train_end"))
    epoch1 = load_file(str(one["final"]))
    assert (out / "lora-000001.safetensors").is_file() and (out / "lora-000001-state").is_dir()
    train_main(lora_args(data, out, "--max_train_epochs", "2", "--resume", str(out / "lora-000001-state")))
    kept = load_file(str(out / "lora-000001.safetensors"))
    assert all(torch.equal(kept[k], epoch1[k]) for k in kept)
    assert not all(torch.equal(kept[k], v) for k, v in load_file(str(out / "lora.safetensors")).items())
    assert (out / "lora-000002.safetensors").is_file()


# 5. silent wrong results ----------------------------------------------------------------------------------------

def test_16bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    from musubi_tuner.dataset.items import load_image

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    rgb = np.asarray(load_image(tmp_path / "g16.png", "RGB"), dtype=np.float64)
    assert rgb.shape == (64, 64, 3)
    assert abs(rgb.mean() - 127.5) < 1 and rgb.min() == 0 and rgb.max() == 255


def gen_args(tiny_models, out, *extra):
    return ["--dit", str(tiny_models["dit"]), "--vae", str(tiny_models["vae"]), "--text_encoder",
            str(tiny_models["text_encoder"]), "--save_path", str(out), "--prompt", "x", "--infer_steps", "2",
            "--image_size", "64", "64", "--device", "cpu", "--seed", "3", *extra]


@pytest.mark.parametrize("extra,words", [(["--flow_shift", "0"], ["--flow_shift 0", "> 0"]),
                                         (["--flow_shift", "-2"], ["--flow_shift -2.0", "> 0"]),
                                         (["--guidance_scale", "-1"], ["--guidance_scale -1.0", ">= 0"]),
                                         (["--seed", "-5"], ["--seed -5", "between 0"])])
def test_generation_ranges(tmp_path, capsys, monkeypatch, tiny_models, extra, words):
    no_model_loads(monkeypatch)
    msg = error_line(capsys, generate_main, gen_args(tiny_models, tmp_path / "o", *extra))
    assert all(w in msg for w in words), msg


def test_prompt_file_flow_shift_zero(tmp_path, capsys, monkeypatch, tiny_models):
    f = tmp_path / "p.txt"
    f.write_text("a --fs 0\n")
    no_model_loads(monkeypatch)
    msg = error_line(capsys, generate_main, gen_args(tiny_models, tmp_path / "o", "--from_file", str(f)))
    assert f"{f}:1" in msg and "--fs 0.0" in msg


def test_guidance_below_one_is_applied_not_ignored(tmp_path, tiny_models):
    def latent(g):
        p = generate_main(gen_args(tiny_models, tmp_path / g, "--guidance_scale", g, "--output_type", "latent"))[0]
        return load_file(str(p))["latent"]

    assert not torch.allclose(latent("0.5"), latent("1.0"))


def test_lora_with_nan_is_refused(tmp_path, capsys, monkeypatch, tiny_models):
    model = tiny.tiny_dit()
    from musubi_tuner.networks.lora_files import LoraWeights

    w = model.transformer_blocks[0].attn.to_q.weight
    up = torch.zeros(w.shape[0], 4)
    up[0, 0] = float("nan")
    path = write_single(to_kohya({"transformer_blocks.0.attn.to_q": LoraWeights(torch.ones(4, w.shape[1]), up, 4.0)}),
                        tmp_path / "nan.safetensors")
    msg = error_line(capsys, generate_main, gen_args(tiny_models, tmp_path / "o", "--lora_weight", str(path)))
    assert "nan.safetensors" in msg and "NaN" in msg


def test_edit_item_does_not_take_another_items_image_as_control(tmp_path):
    from musubi_tuner.dataset.config import load_dataset_config
    from musubi_tuner.dataset.items import collect_items
    from musubi_tuner.models.registry import VERSIONS

    img, ctrl = tmp_path / "img", tmp_path / "ctrl"
    img.mkdir()
    ctrl.mkdir()
    for stem in ("photo", "photo_1"):
        Image.new("RGB", (32, 32)).save(img / f"{stem}.png")
        (img / f"{stem}.txt").write_text("x")
        Image.new("RGB", (32, 32)).save(ctrl / f"{stem}.png")
    Image.new("RGB", (32, 32)).save(ctrl / "photo_2.png")  # photo's second control
    toml = tmp_path / "d.toml"
    toml.write_text(f'[[datasets]]\nresolution = 32\nimage_directory = "{img}"\ncontrol_directory = "{ctrl}"\n')
    items = {it.key: [p.name for p in it.controls] for it in collect_items(load_dataset_config(toml),
                                                                           VERSIONS["edit-2509"])}
    assert items == {"photo": ["photo.png", "photo_2.png"], "photo_1": ["photo_1.png"]}


def test_resume_with_fewer_steps_is_refused(tmp_path, capsys, monkeypatch, data):
    out = tmp_path / "o"
    train_main(lora_args(data, out, "--save_every_n_steps", "3", "--save_state", steps=4))
    no_model_loads(monkeypatch)
    msg = error_line(capsys, train_main, lora_args(data, out, "--resume", str(out / "lora-step00000003-state"),
                                                   steps=2))
    assert "at step 3" in msg and "ends at step 2" in msg and "--max_train_steps" in msg


# 6. results thrown away late ------------------------------------------------------------------------------------

def test_generation_checks_files_and_save_path_before_any_model(tmp_path, capsys, monkeypatch, tiny_models):
    no_model_loads(monkeypatch)
    args = gen_args(tiny_models, tmp_path / "o")
    args[args.index("--vae") + 1] = str(tiny_models["dit"])
    msg = error_line(capsys, generate_main, args)
    assert "--vae" in msg and "is a Qwen-Image DiT, not the Qwen-Image VAE" in msg
    args = gen_args(tiny_models, tmp_path / "o")
    args[args.index("--text_encoder") + 1] = str(tiny_models["dit"])
    t0 = time.time()
    msg = error_line(capsys, generate_main, args)
    assert "--text_encoder" in msg and "not the text encoder" in msg and time.time() - t0 < 10
    a_file = tmp_path / "file.png"
    a_file.write_bytes(b"x")
    msg = error_line(capsys, generate_main, gen_args(tiny_models, a_file))
    assert "--save_path" in msg and "is a file" in msg


def test_training_names_a_dit_passed_as_vae(tmp_path, capsys, monkeypatch, data):
    models, _ = data
    args = lora_args(data, tmp_path / "o")
    args[args.index("--vae") + 1] = str(models["dit"])
    no_model_loads(monkeypatch)
    msg = error_line(capsys, train_main, args)
    assert "--vae" in msg and "is a Qwen-Image DiT" in msg and "stale" not in msg


# 7. permissions --------------------------------------------------------------------------------------------------

def test_written_files_get_the_usual_permissions(tmp_path, data):
    old = os.umask(0o022)
    try:
        r = train_main(lora_args(data, tmp_path / "o", "--save_state_on_train_end", steps=1))
    finally:
        os.umask(old)
    assert r["final"].stat().st_mode & 0o777 == 0o644
    state = tmp_path / "o" / "lora-state"
    assert state.stat().st_mode & 0o777 == 0o755
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in state.iterdir())


# 8. glob names, leftovers ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["lor?", "lora[1]", "a.*"])
def test_pruning_and_leftovers_match_names_literally(tmp_path, data, name):
    out = tmp_path / "o"
    out.mkdir()
    bystander = ["lora-step00000001.safetensors", "lorb-step00000001.safetensors", "lora1-step00000001.safetensors",
                 "ab-step00000001.safetensors"]
    for b in bystander:
        (out / b).write_bytes(b"other run")
    mine_leftover = out / f".{name}-step00000009.safetensors.abc123.tmp"
    other_leftover = out / ".lora-step00000009.safetensors.abc123.tmp"
    for p in (mine_leftover, other_leftover):
        p.write_bytes(b"half")
    train_main(lora_args(data, out, "--output_name", name, "--save_every_n_steps", "1", "--save_last_n_steps", "2",
                         steps=4))
    names = {p.name for p in out.iterdir()}
    assert set(bystander) <= names and other_leftover.name in names and mine_leftover.name not in names
    assert {f"{name}-step00000002.safetensors", f"{name}-step00000003.safetensors", f"{name}.safetensors"} <= names
    assert f"{name}-step00000001.safetensors" not in names


# 9. one line instead of a traceback ------------------------------------------------------------------------------

def test_non_utf8_and_malformed_inputs(tmp_path, capsys, monkeypatch):
    from musubi_tuner.dataset.config import load_dataset_config
    from musubi_tuner.dataset.items import collect_items, load_image
    from musubi_tuner.generation.prompts import GenerationSpec, read_prompt_file
    from musubi_tuner.models.registry import VERSIONS

    img = tmp_path / "img"
    img.mkdir()
    Image.new("RGB", (32, 32)).save(img / "a.png")
    (img / "a.txt").write_bytes("caf\xe9".encode("latin-1"))
    toml = tmp_path / "d.toml"
    toml.write_text(f'[[datasets]]\nresolution = 32\nimage_directory = "{img}"\n')
    with pytest.raises(UserError, match=r"a.txt is not UTF-8 text \(byte 3"):
        collect_items(load_dataset_config(toml), VERSIONS["original"])
    jsonl = tmp_path / "m.jsonl"
    for content, pattern in ((b'{"image_path": "a.png", "caption": "caf\xe9"}\n', "not UTF-8"),
                             (b'{"image_path": 5, "caption": "x"}\n', "non-empty strings, got 5"),
                             (b'{"image_path": ["a.png"], "caption": "x"}\n', "non-empty strings")):
        jsonl.write_bytes(content)
        toml.write_text(f'[[datasets]]\nresolution = 32\nimage_jsonl_file = "{jsonl}"\ncache_directory = "{img}"\n')
        with pytest.raises(UserError, match=pattern):
            collect_items(load_dataset_config(toml), VERSIONS["original"])
    prompts = tmp_path / "p.txt"
    prompts.write_bytes(b"caf\xe9\n")
    with pytest.raises(UserError, match="prompt file .*not UTF-8"):
        read_prompt_file(prompts, GenerationSpec(prompt=""))
    for text, pattern in (("general = 5\n[[datasets]]\nimage_directory = 'x'\n", "general must be a table"),
                          ("datasets = [1, 2]\n", "must be a \\[\\[datasets\\]\\] table")):
        toml.write_text(text)
        with pytest.raises(UserError, match=pattern):
            load_dataset_config(toml)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(UserError, match="too large to decode safely"):
        load_image(img / "a.png", "RGB")


def test_output_dir_under_a_file(tmp_path, capsys, monkeypatch, data):
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    no_model_loads(monkeypatch)
    msg = error_line(capsys, train_main, lora_args(data, blocker / "out"))
    assert "--output_dir" in msg and "is a file" in msg


def test_resume_mismatches_are_one_line(tmp_path, capsys, data):
    out = tmp_path / "o"
    train_main(lora_args(data, out, "--save_state_on_train_end", steps=1))
    state = out / "lora-state"
    cases = [
        (["--network_dim", "8"], "other trainable weights", "--network_dim"),
        (["--optimizer_type", "adafactor"], "--optimizer_type 'adamw'", "same --optimizer_type"),
    ]
    for extra, w1, w2 in cases:
        msg = error_line(capsys, train_main, lora_args(data, tmp_path / "r", "--resume", str(state), *extra))
        assert w1 in msg and w2 in msg, msg
    (state / "optimizer.pt").rename(state / "optimizer.bak")
    msg = error_line(capsys, train_main, lora_args(data, tmp_path / "r", "--resume", str(state)))
    assert "lacks optimizer.pt" in msg
    (state / "optimizer.bak").rename(state / "optimizer.pt")
    blob = (state / "trainable.safetensors").read_bytes()
    (state / "trainable.safetensors").write_bytes(blob[: len(blob) // 2])
    msg = error_line(capsys, train_main, lora_args(data, tmp_path / "r", "--resume", str(state)))
    assert "trainable.safetensors cannot be read" in msg
    msg = error_line(capsys, train_main, lora_args(data, tmp_path / "r", "--resume", str(tmp_path)))
    assert "not a training state folder" in msg


def test_bad_lora_files_are_one_line(tmp_path, capsys, data):
    from musubi_tuner.convert_lora import main as convert_main

    out = tmp_path / "o"
    first = train_main(lora_args(data, out, steps=1))["final"]
    msg = error_line(capsys, train_main, lora_args(data, tmp_path / "r", "--network_weights", str(first),
                                                   "--network_dim", "8"))
    assert "has rank 4 but this network has rank 8" in msg and "--dim_from_weights" in msg
    sd = load_file(str(first))
    k = next(k for k in sd if k.endswith("lora_up.weight"))
    sd[k] = torch.zeros(sd[k].shape[0], 2)
    save_file(sd, str(tmp_path / "mixed.safetensors"))
    (tmp_path / "random.safetensors").write_bytes(os.urandom(4096))
    (tmp_path / "cut.safetensors").write_bytes(first.read_bytes()[:100])
    for name, words in (("mixed", "mismatched LoRA shapes"), ("random", "not a valid safetensors"),
                        ("cut", "not a valid safetensors")):
        msg = error_line(capsys, convert_main, ["--input", str(tmp_path / f"{name}.safetensors"), "--output",
                                                str(tmp_path / f"{name}_out.safetensors"), "--target", "diffusers"])
        assert words in msg, msg
        assert not (tmp_path / f"{name}_out.safetensors").exists()
    state_file = tmp_path / "state_trainable.safetensors"
    save_file({"unet_loras.0.lora_down.weight": torch.zeros(1, 2), "unet_loras.0.lora_up.weight": torch.zeros(2, 1)},
              str(state_file))
    msg = error_line(capsys, convert_main, ["--input", str(state_file), "--output", str(tmp_path / "x.safetensors"),
                                            "--target", "kohya"])
    assert "training state folder" in msg and "--resume" in msg


# Third pass ======================================================================================================

# 1. links in a shared output folder -------------------------------------------------------------------------------

def test_symlinked_lock_file_is_refused_and_its_target_untouched(tmp_path, capsys, monkeypatch, data):
    out = tmp_path / "o"
    out.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (out / ".lora.lock").symlink_to(victim)
    no_model_loads(monkeypatch)
    msg = error_line(capsys, train_main, lora_args(data, out, steps=1))
    assert "run lock" in msg and "symbolic link" in msg and "rm " in msg
    assert victim.read_text() == "precious" and (out / ".lora.lock").is_symlink()


def test_loss_log_replaced_by_a_link_is_not_written_through(tmp_path):
    from musubi_tuner.training.outputs import LossLog

    log = LossLog(tmp_path / "l.csv", ["step", "loss"])
    log.start(None)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "l.csv").unlink()
    (tmp_path / "l.csv").symlink_to(victim)
    with pytest.raises(UserError, match="symbolic link"):
        log.append({"step": 1, "loss": 0.5})
    assert victim.read_text() == "precious"


def test_state_folder_that_is_a_link_is_replaced_not_followed(tmp_path):
    from musubi_tuner.training.checkpoints import replace_folder

    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "keep.txt").write_text("x")
    (tmp_path / "lora-state").symlink_to(target)
    new = tmp_path / "new"
    new.mkdir()
    replace_folder(new, tmp_path / "lora-state")
    assert (target / "keep.txt").read_text() == "x" and (tmp_path / "lora-state").is_dir()
    assert not (tmp_path / "lora-state").is_symlink()


# 2. no silent black images -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["nan", "1e30", "-1000"])
def test_lora_multiplier_is_range_checked_before_loading(tmp_path, capsys, monkeypatch, tiny_models, value):
    no_model_loads(monkeypatch)
    msg = error_line(capsys, generate_main, gen_args(tiny_models, tmp_path / "o", "--lora_multiplier", value))
    assert "--lora_multiplier" in msg and ("finite" in msg or "between -100 and 100" in msg), msg


def test_huge_finite_lora_gives_an_error_not_a_black_image(tmp_path, capsys, tiny_models):
    from musubi_tuner.networks.lora_files import LoraWeights

    model = tiny.tiny_dit()
    loras = {}
    for name, mod in model.named_modules():
        if name.startswith("transformer_blocks.") and isinstance(mod, torch.nn.Linear):
            loras[name] = LoraWeights(torch.full((4, mod.in_features), 1e9), torch.full((mod.out_features, 4), 1e9),
                                      4.0)
    path = write_single(to_kohya(loras), tmp_path / "huge.safetensors")
    out = tmp_path / "o"
    msg = error_line(capsys, generate_main, gen_args(tiny_models, out, "--lora_weight", str(path)))
    assert "denoised latents" in msg and "--lora_multiplier" in msg and "0 of 1" in msg, msg
    assert not list(out.glob("*.png"))


def test_latent_check_catches_nan_and_absurd_values():
    from musubi_tuner.generation.saving import check_latents

    check_latents(torch.randn(16, 1, 8, 8) * 5, "ok")
    for bad, words in ((torch.full((16, 1, 8, 8), float("nan")), "not finite"),
                       (torch.full((16, 1, 8, 8), 1e18), "absurdly large")):
        with pytest.raises(UserError, match=words):
            check_latents(bad, "x")


# 3. resolutions that hang or cannot fit --------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["1000000", "[1024, 0]", "16"])
def test_absurd_resolution_is_refused_at_once(tmp_path, value):
    from musubi_tuner.dataset.config import load_dataset_config

    toml = tmp_path / "d.toml"
    toml.write_text(f'[[datasets]]\nresolution = {value}\nimage_directory = "{tmp_path}"\n')
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="between 32 and 8192 pixels per side"):
        load_dataset_config(toml)
    assert time.perf_counter() - t0 < 5


def test_resolution_too_large_for_this_machine_is_refused_with_the_estimate(tmp_path, capsys, monkeypatch,
                                                                            tiny_models):
    from musubi_tuner.qwen_image_cache_latents import main as cache_latents

    img = tmp_path / "img"
    img.mkdir()
    Image.new("RGB", (4096, 4096), "red").save(img / "a.png")
    (img / "a.txt").write_text("red")
    toml = tmp_path / "d.toml"
    toml.write_text(f'[[datasets]]\nresolution = 4096\nimage_directory = "{img}"\ncache_directory = "{tmp_path / "c"}"\n')
    monkeypatch.setattr("musubi_tuner.memory.budget.free_bytes", lambda device: 8 * 10**9)
    monkeypatch.setattr("musubi_tuner.qwen_image.vae.load_vae", lambda *a, **k: pytest.fail("the VAE loaded"))
    msg = error_line(capsys, cache_latents, ["--dataset_config", str(toml), "--vae", str(tiny_models["vae"]),
                                             "--device", "cpu"])
    assert "4096x4096" in msg and "GB" in msg and "8.0 GB are free" in msg and "--vae_enable_tiling" in msg, msg


# 4. exactly one error line, saves reported truthfully --------------------------------------------------------------

def _fail_when(monkeypatch, target: str, err: OSError, when=lambda *a, **k: True):
    import importlib

    module, name = target.rsplit(".", 1)
    mod = importlib.import_module(module)
    real = getattr(mod, name)

    def fake(*a, **k):
        if when(*a, **k):
            raise err
        return real(*a, **k)

    monkeypatch.setattr(mod, name, fake)


def test_lock_release_in_a_folder_that_became_read_only_is_quiet(tmp_path, capsys, monkeypatch, data):
    out = tmp_path / "o"
    real_unlink = Path.unlink

    def unlink(self, *a, **k):
        if self.name == ".lora.lock":
            raise PermissionError(13, "Permission denied", str(self))
        return real_unlink(self, *a, **k)

    monkeypatch.setattr(Path, "unlink", unlink)
    train_main(lora_args(data, out, steps=1))
    assert "Traceback" not in capsys.readouterr().err


def test_disk_full_at_a_periodic_save_is_one_line_naming_the_save(tmp_path, capsys, monkeypatch, data):
    import errno

    out = tmp_path / "o"
    _fail_when(monkeypatch, "musubi_tuner.training.trainer.save_state",
               OSError(errno.ENOSPC, "No space left on device", str(out / "x")))
    msg = error_line(capsys, train_main, lora_args(data, out, "--save_every_n_steps", "2", "--save_state"), code=1)
    assert "saving lora-step00000002-state (after step 2) failed" in msg and "the disk is full" in msg, msg
    # the interrupted weights were written, the state could not be: the line says exactly that
    assert "weights after step 2 are saved" in msg and "but not the state" in msg, msg
    assert (out / "lora-interrupted.safetensors").is_file() and not (out / "lora-interrupted-state").exists()
    assert "nothing was saved" not in msg


def test_file_size_limit_in_a_real_process_is_one_line(tmp_path, data):
    """ulimit -f: writes fail with EFBIG (Python ignores SIGXFSZ); the final save fails; one error line, no traceback,
    and what was saved is said truthfully."""
    import resource

    models, toml = data
    out = tmp_path / "o"
    out.mkdir()
    argv = lora_args(data, out, steps=2)

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (60000, 60000))  # logs fit, a 114 KB LoRA does not

    p = subprocess.run([sys.executable, "-m", "musubi_tuner.qwen_image_train_network", *argv], capture_output=True,
                       text=True, preexec_fn=limit, timeout=300, env={**os.environ, "PYTHONPATH": str(SRC.parent)})
    err = p.stderr
    assert p.returncode == 1, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "file size limit" in lines[0] and "saving lora.safetensors (after step 2) failed" in lines[0], lines[0]
    saved = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    if "saved " + str(out / "lora-interrupted.safetensors") in err:
        assert "lora-interrupted.safetensors" in saved
    assert ("nothing was saved" in lines[0]) == ("lora-interrupted.safetensors" not in saved)


# 5. damaged state folders ------------------------------------------------------------------------------------------

def test_damaged_state_fields_are_one_line(tmp_path, capsys, data):
    import shutil

    out = tmp_path / "o"
    train_main(lora_args(data, out, "--save_state_on_train_end", steps=1))
    good = out / "lora-state"

    def damaged(name, fix):
        d = tmp_path / name
        shutil.copytree(good, d)
        fix(d)
        return d

    def edit_json(**changes):
        def fix(d):
            meta = json.loads((d / "train_state.json").read_text())
            meta.update(changes)
            (d / "train_state.json").write_text(json.dumps(meta))
        return fix

    cases = [
        (damaged("norng", lambda d: save_file({"x": torch.zeros(3, dtype=torch.uint8)}, str(d / "rng.safetensors"))),
         ["rng.safetensors", "'cpu'"]),
        (damaged("sched5", edit_json(scheduler=5)), ["train_state.json", "scheduler 5"]),
        (damaged("negstep", edit_json(global_step=-3)), ["train_state.json", "global_step -3", ">= 0"]),
        (damaged("strstep", edit_json(epoch="2")), ["epoch '2'"]),
        (damaged("schedkind", edit_json(scheduler={"last_epoch": "x"})), ["scheduler.last_epoch", "expected a number"]),
    ]
    for state, words in cases:
        msg = error_line(capsys, train_main, lora_args(data, tmp_path / "r", "--resume", str(state), steps=3))
        assert all(w in msg for w in words) and "another state folder" in msg, msg


def test_optimizer_file_with_objects_is_refused_without_torchs_unsafe_hint(tmp_path, capsys, data):
    import shutil

    out = tmp_path / "o"
    train_main(lora_args(data, out, "--save_state_on_train_end", steps=1))
    state = tmp_path / "s"
    shutil.copytree(out / "lora-state", state)
    torch.save({"state": {}, "param_groups": [], "x": Path("/")}, state / "optimizer.pt")
    msg = error_line(capsys, train_main, lora_args(data, tmp_path / "r", "--resume", str(state), steps=3))
    assert "refused" in msg and "could run code" in msg and "weights_only" not in msg, msg


def test_resume_mismatch_names_the_whole_setting(tmp_path, capsys, data):
    from musubi_tuner.qwen_image_train import main as full_main

    out = tmp_path / "o"
    train_main(lora_args(data, out, "--save_state_on_train_end", steps=1))
    models, toml = data
    argv = train_args(models, toml, tmp_path / "r", "original", "--max_train_steps", "3", "--resume",
                      str(out / "lora-state"))
    msg = error_line(capsys, full_main, argv)
    assert "resume with the same training script" in msg, msg


# 6. checks before any model loads ----------------------------------------------------------------------------------

@pytest.mark.parametrize("extra,words", [
    (["--network_dropout", "2"], ["--network_dropout 2.0", "[0, 1)"]),
    (["--network_alpha", "nan"], ["--network_alpha nan", "finite"]),
    (["--network_alpha", "-1"], ["--network_alpha -1.0", ">= 0"]),
    (["--sigmoid_scale", "nan"], ["--sigmoid_scale nan", "finite"]),
    (["--sigmoid_scale", "0"], ["--sigmoid_scale 0.0", "> 0"]),
    (["--discrete_flow_shift", "inf"], ["--discrete_flow_shift inf", "finite"]),
    (["--network_module", "os"], ["--network_module os", "not a network module"]),
    (["--network_module", "no_such_module_xyz"], ["--network_module no_such_module_xyz", "not found"]),
    (["--network_args", "rank_dropout=1.5"], ["rank_dropout=1.5", "[0, 1)"]),
    (["--network_args", "exclude_patterns=[broken"], ["exclude_patterns", "list of patterns"]),
    (["--network_args", "exclude_patterns=['(']"], ["exclude_patterns", "invalid regex"]),
    (["--network_module", "networks.lokr", "--network_args", "factor=0"], ["factor=0", ">= 1"]),
])
def test_network_and_sampler_options_are_checked_before_loading(tmp_path, capsys, monkeypatch, data, extra, words):
    no_model_loads(monkeypatch)
    monkeypatch.setattr("musubi_tuner.training.trainer.prepare_output", lambda *a: pytest.fail("the run started"))
    msg = error_line(capsys, train_main, lora_args(data, tmp_path / "o", *extra))
    assert all(w in msg for w in words), msg


def test_config_file_typo_is_an_error_and_other_architectures_keys_a_warning(tmp_path, capsys, monkeypatch, data,
                                                                             caplog):
    from musubi_tuner.musubi_options import MUSUBI_OPTIONS
    from musubi_tuner.qwen_image_train_network import build_parser

    no_model_loads(monkeypatch)
    cfg = tmp_path / "c.toml"
    cfg.write_text("network_dimm = 8\n")
    msg = error_line(capsys, train_main, lora_args(data, tmp_path / "o", "--config_file", str(cfg)))
    assert "network_dimm" in msg and "did you mean network_dim?" in msg, msg
    ours = {a.dest for a in build_parser()._actions}
    other = sorted(MUSUBI_OPTIONS - ours)
    assert "fp8_t5" in other or other  # keys of musubi-tuner's other architectures exist
    cfg.write_text(f"{other[0]} = 1\nsave_every_n_epochs = 7\n")
    from musubi_tuner import cli_options as opts

    import logging
    with caplog.at_level(logging.WARNING):
        args = opts.parse_args(build_parser(), lora_args(data, tmp_path / "o", "--config_file", str(cfg)))
    assert args.save_every_n_epochs == 7 and other[0] in caplog.text and "other model architectures" in caplog.text


# 7. generation keeps what it finished -----------------------------------------------------------------------------

def test_interrupted_prompt_file_keeps_every_finished_image(tmp_path, capsys, monkeypatch, tiny_models):
    from musubi_tuner.generation import pipeline as G

    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt {i} --d {i}\n" for i in range(5)))
    real, calls = G.generate_one, []

    def stop_at_third(model, job, index, *a, **k):
        calls.append(index)
        if index == 2:
            raise KeyboardInterrupt
        return real(model, job, index, *a, **k)

    monkeypatch.setattr(G, "generate_one", stop_at_third)
    out = tmp_path / "o"
    argv = [a for a in gen_args(tiny_models, out, "--from_file", str(prompts)) if a not in ("--prompt", "x")]
    with pytest.raises(SystemExit) as e:
        generate_main(argv)
    assert e.value.code == 130
    assert len(list(out.glob("*.png"))) == 2
    assert "interrupted: 2 of 5 generations finished and saved" in capsys.readouterr().err


def test_sigterm_to_a_generation_process_keeps_the_finished_images(tmp_path, tiny_models):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt {i} --d {i}\n" for i in range(400)))
    out = tmp_path / "o"
    argv = [a for a in gen_args(tiny_models, out, "--from_file", str(prompts)) if a not in ("--prompt", "x")]
    p = subprocess.Popen([sys.executable, "-m", "musubi_tuner.qwen_image_generate_image", *argv],
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(SRC.parent)})
    deadline = time.time() + 240
    while not list(out.glob("*.png")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 143, err
    n = len(list(out.glob("*.png")))
    assert 1 <= n < 400 and f"interrupted: {n} of 400 generations finished and saved" in err, err
    assert not list(out.glob(".*.tmp")) and "Traceback" not in err


# 8. wording -------------------------------------------------------------------------------------------------------

def test_flow_shift_inf_names_the_option(tmp_path, capsys, monkeypatch, tiny_models):
    no_model_loads(monkeypatch)
    msg = error_line(capsys, generate_main, gen_args(tiny_models, tmp_path / "o", "--flow_shift", "inf"))
    assert msg.startswith("error: --flow_shift inf"), msg


def test_stale_cache_error_reads_as_a_sentence(tmp_path, capsys, data):
    models, toml = data
    root = toml.parent
    work = tmp_path / "copy"
    import shutil

    shutil.copytree(root, work, ignore=shutil.ignore_patterns("models"))
    text = toml.read_text().replace(str(root), str(work))
    (work / "dataset.toml").write_text(text)
    caption = next((work / "data").glob("*.txt"))
    caption.write_text("a changed caption")
    argv = train_args(models, work / "dataset.toml", tmp_path / "o", "original", "--max_train_steps", "1")
    msg = error_line(capsys, train_main, argv)
    assert "is out of date (" in msg and "run qwen_image_cache_text_encoder_outputs.py" in msg, msg


def test_output_dir_that_is_a_dataset_folder_is_refused(tmp_path, capsys, monkeypatch, data):
    models, toml = data
    img = next(line.split('"')[1] for line in toml.read_text().splitlines() if line.startswith("image_directory"))
    no_model_loads(monkeypatch)
    msg = error_line(capsys, train_main, lora_args(data, Path(img)))
    assert "is the image_directory of" in msg and "loss plot" in msg
