"""The web UI: each step through its API on the nano models (the real scripts run as subprocesses), and the whole
flow in a real headless Chromium (the system's, as .ci/run installs it)."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from PIL import Image
from safetensors import safe_open

from musubi_tuner.ui.server import build_parser, create_app

fastapi_testclient = pytest.importorskip("fastapi.testclient")
CHROMIUM = "/usr/bin/chromium"
DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "images" / "web_ui.png"


@pytest.fixture
def ui(tmp_path):
    app = create_app(tmp_path / "project")
    with fastapi_testclient.TestClient(app) as client:
        client.app_state = app.state
        yield client


def ok(response):
    assert response.status_code == 200, response.text
    return response.json()


def error_of(response, status=400) -> str:
    assert response.status_code == status, response.text
    return response.json()["error"]


def small_run(ui, steps=4, every=2, **training):
    ok(ui.post("/api/settings", json={"training": {"max_train_steps": steps, "save_every_n_steps": every,
                                                   "sample_every_n_steps": every, **training}}))


def test_listens_on_localhost_unless_asked(capsys):
    from musubi_tuner.ui.server import main

    args = build_parser().parse_args([])
    assert args.host == "127.0.0.1" and args.port == 7860
    with pytest.raises(SystemExit):
        main(["--port", "0"])
    assert "error: --port 0: give 1 to 65535" in capsys.readouterr().err


def test_only_this_machine_drives_it(ui):
    assert ui.get("/api/state", headers={"host": "evil.example:7860"}).status_code == 403
    form = ui.post("/api/train", data={"resume": "false"})  # what a cross-site form can send
    assert form.status_code == 415
    assert ui.get("/api/state", headers={"host": "localhost:7860"}).status_code == 200


def test_settings_and_models(ui):
    state = ok(ui.get("/api/state"))
    assert state["settings"]["model_version"] == "original" and "2.1" in state["versions"]
    models = ok(ui.get("/api/models"))
    assert models["ok"] and models["nano"]
    assert models["files"]["dit"]["what"] == "a Qwen-Image DiT" and "original" in models["files"]["dit"]["detected"]
    assert "layered" not in models["files"]["dit"]["detected"]
    assert "model version 'nope'" in error_of(ui.post("/api/settings", json={"model_version": "nope"}))
    ok(ui.post("/api/settings", json={"models": {"dit": "/no/such/dit.safetensors", "vae": "x", "text_encoder": "y"}}))
    bad = ok(ui.get("/api/models"))
    assert not bad["ok"] and "file not found" in bad["files"]["dit"]["error"]
    ok(ui.post("/api/settings", json={"model_version": "edit", "models": {"dit": "", "vae": "", "text_encoder": ""}}))
    assert "no nano model of edit" in ok(ui.get("/api/models"))["error"]


def test_dataset_grid_captions_buckets_and_file_access(ui, tmp_path):
    view = ok(ui.post("/api/dataset/nano", json={"items": 8}))
    assert len(view["items"]) == 16 and view["buckets"] == {"64x64": 16}  # purple + known colours
    assert "[[datasets]]" in view["toml"]
    item = view["items"][0]
    assert ui.get("/api/image", params={"path": item["image"]}).status_code == 200
    ok(ui.post("/api/dataset/caption", json={"image": item["image"], "caption": "a green triangle, edited"}))
    assert Path(item["caption_file"]).read_text() == "a green triangle, edited\n"
    assert ok(ui.get("/api/dataset"))["items"][0]["caption"] == "a green triangle, edited"
    assert "not an image of the dataset" in error_of(ui.post("/api/dataset/caption", json={
        "image": str(tmp_path / "x.png"), "caption": "x"}))
    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    assert ui.get("/api/image", params={"path": str(outside)}).status_code == 403
    assert ui.get("/api/image", params={"path": "/etc/passwd"}).status_code == 404
    # an own folder: the dataset config is written from the fields, with the model version's rules
    own = tmp_path / "mine"
    own.mkdir()
    for i, size in enumerate(((64, 128), (128, 64), (96, 96))):
        Image.new("RGB", size).save(own / f"{i}.png")
        (own / f"{i}.txt").write_text(f"picture {i}")
    ok(ui.post("/api/settings", json={"dataset": {"config": "", "image_directory": str(own), "resolution": 128}}))
    view = ok(ui.get("/api/dataset"))
    assert len(view["items"]) == 3 and sum(view["buckets"].values()) == 3 and len(view["buckets"]) == 3
    assert f'image_directory = "{own}"' in view["toml"]
    ok(ui.post("/api/settings", json={"dataset": {"image_directory": str(tmp_path / "none")}}))
    assert "not found" in error_of(ui.get("/api/dataset"))


def test_memory_plan(ui):
    nano = ok(ui.post("/api/memory", json={"gpu_gib": 8}))
    assert nano["fits"] and "--blocks_to_swap" not in nano["options"] and nano["layers"] == 4
    assert "give the card's memory" in error_of(ui.post("/api/memory", json={"gpu_gib": 0}))
    ok(ui.post("/api/settings", json={"model_version": "2.1"}))
    assert "does not cover Qwen-Image-2.1" in error_of(ui.post("/api/memory", json={"gpu_gib": 24}))


def test_memory_plan_of_the_20b_model():
    """The plan follows the fake-tensor estimate: 24 GiB needs fp8 and swapped blocks, 80 GiB none of them."""
    from musubi_tuner.memory.estimate import plan, quick_estimate

    e = quick_estimate(60, 1024, fp8=True, swap=16, optimizer="adamw")
    assert 18.0 < e["peak_gib"] < 19.0  # the full 60-block fake run: 18.54 (docs/memory.md)
    big, small = plan(80, 60, 1024), plan(24, 60, 1024)
    assert "--fp8_scaled" not in big.options and big.fits
    assert "--fp8_scaled" in small.options and "--blocks_to_swap" in small.options and small.fits
    assert small.estimate["total_gib"] <= 24 * 0.92


def wait(ui, run_id, timeout=300):
    end = time.time() + timeout
    while time.time() < end:
        run = ok(ui.get(f"/api/runs/{run_id}"))
        if run["state"] not in ("queued", "running", "stopping"):
            return run
        time.sleep(0.2)
    raise AssertionError(f"run {run_id} did not finish")


def test_train_stop_resume_generate_and_tools(ui):
    ok(ui.post("/api/dataset/nano", json={"items": 8}))
    small_run(ui, steps=400, every=100, validation_split=0)
    runs = ok(ui.post("/api/train", json={}))["runs"]
    assert [r["kind"] for r in runs] == ["cache_latents", "cache_text", "train"]
    assert runs[-1]["command"].startswith("python -m musubi_tuner.qwen_image_train_network --dit ")
    train_id = runs[-1]["id"]
    end = time.time() + 240
    while (ok(ui.get(f"/api/runs/{train_id}"))["progress"] or [0])[0] < 3:  # a few steps done
        assert time.time() < end
        time.sleep(0.2)
    ok(ui.post(f"/api/runs/{train_id}/stop", json={}))
    stopped = wait(ui, train_id)
    assert stopped["state"] == "stopped"
    out = Path(stopped["info"]["output_dir"])
    assert (out / "my-lora-interrupted-state").is_dir()
    small_run(ui, steps=stopped["progress"][0] + 2, every=100, validation_split=0)
    resumed = ok(ui.post("/api/train", json={"resume": True, "cache": False}))["runs"][-1]
    assert "--resume" in resumed["command"] and "interrupted-state" in resumed["command"]
    done = wait(ui, resumed["id"])
    assert done["state"] == "done", done["log"][-5:]
    lora = done["results"]["lora"]
    with safe_open(lora, "pt") as f:
        assert int(f.metadata()["ss_steps"]) == stopped["progress"][0] + 2

    gen = ok(ui.post("/api/generate", json={"prompt": "a small purple circle at the center on a white background",
                                            "seed": 3, "lora": lora}))["runs"]
    images = [wait(ui, r["id"])["results"]["images"] for r in gen]
    assert all(len(i) == 1 for i in images)
    base, with_lora = (Image.open(i[0]) for i in images)
    assert base.size == with_lora.size == (64, 64) and base.tobytes() != with_lora.tobytes()
    assert base.text["seed"] == with_lora.text["seed"] == "3"

    assert "needs the run's checkpoints" in error_of(ui.post("/api/tool", json={"name": "ema", "lora": lora}))
    merged = wait(ui, ok(ui.post("/api/tool", json={"name": "merge", "lora": lora}))["id"])
    assert merged["state"] == "done" and "merge_lora --dit" in merged["command"]
    convert = wait(ui, ok(ui.post("/api/tool", json={"name": "convert", "lora": lora}))["id"])
    assert convert["state"] == "done" and Path(lora.replace(".safetensors", "_diffusers.safetensors")).is_file()
    assert "file not found" in error_of(ui.post("/api/tool", json={"name": "convert", "lora": "/nope.safetensors"}))
    assert "nothing to resume" not in str(ok(ui.get("/api/runs")))


def test_edit_dataset_shows_controls_and_captioning_runs_the_tool(ui):
    ok(ui.post("/api/settings", json={"model_version": "edit-2511"}))
    view = ok(ui.post("/api/dataset/nano", json={"items": 4}))
    assert view["items"] and all(len(i["controls"]) == 1 for i in view["items"])
    assert ui.get("/api/image", params={"path": view["items"][0]["controls"][0]}).status_code == 200
    runs = ok(ui.post("/api/dataset/autocaption", json={}))["runs"]
    assert len(runs) == 2 and all("caption_images_by_qwen_vl --image_dir" in r["command"] for r in runs)
    done = wait(ui, runs[0]["id"])  # the nano text encoder has no language-model head: the tool's one error line
    assert done["state"] == "failed" and "has no lm_head" in done["error"] and "--model_path" in done["error"]
    ok(ui.post("/api/settings", json={"model_version": "layered"}))
    view = ok(ui.post("/api/dataset/nano", json={"items": 2}))
    assert all(len(i["layers"]) >= 1 for i in view["items"])


def test_a_failed_run_shows_its_error_line(ui):
    ok(ui.post("/api/dataset/nano", json={"items": 4}))
    small_run(ui, extra_options="--network_dim_typo 3")
    runs = ok(ui.post("/api/train", json={"cache": False}))["runs"]
    assert [r["kind"] for r in runs] == ["train"]
    failed = wait(ui, runs[-1]["id"])
    assert failed["state"] == "failed" and "error: unrecognized arguments" in failed["error"] and "--network_dim_typo" in failed["error"]
    assert "nothing to resume" in error_of(ui.post("/api/train", json={"resume": True}))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not Path(CHROMIUM).exists() and not os.environ.get("MUSUBI_BROWSER_TESTS"),
                    reason="Chromium is not installed (.ci/run installs it and sets MUSUBI_BROWSER_TESTS)")
def test_the_whole_flow_in_a_browser(tmp_path):
    """Nano dataset -> cache and train a few steps -> the loss curve and a sample image on the page; screenshot."""
    import uvicorn
    from playwright.sync_api import expect, sync_playwright

    port = free_port()
    app = create_app(tmp_path / "project")
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])
            page = browser.new_page(viewport={"width": 1200, "height": 1600})
            page.goto(f"http://127.0.0.1:{port}/")
            page.click("#check-models")
            expect(page.locator("#model-results")).to_contain_text("a Qwen-Image DiT", timeout=30_000)
            page.click("#nano-dataset")
            expect(page.locator("#items .item")).to_have_count(96, timeout=30_000)
            for field, value in (("#max_train_steps", "6"), ("#save_every_n_steps", "3"),
                                 ("#sample_every_n_steps", "3")):
                page.fill(field, value)
            page.click("#train")
            expect(page.locator("#runs tbody tr")).to_have_count(3, timeout=10_000)
            expect(page.locator("#run-title")).to_contain_text("done", timeout=240_000)
            expect(page.locator("#loss-chart polyline.loss")).to_have_count(1, timeout=10_000)
            expect(page.locator("#samples img").first).to_be_visible(timeout=10_000)
            assert page.locator("#samples img").first.evaluate("img => img.naturalWidth") == 64
            if os.environ.get("UPDATE_DOCS_SCREENSHOT"):  # the docs' picture also shows before / after (the API
                page.click("#generate")                    # test covers generation)
                expect(page.locator("#compare img")).to_have_count(2, timeout=120_000)
            shot = tmp_path / "web_ui.png"
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
        assert Image.open(shot).size[0] == 1200
        if os.environ.get("UPDATE_DOCS_SCREENSHOT"):
            shutil.copy(shot, DOCS_SCREENSHOT)
    finally:
        server.should_exit = True
        thread.join(10)
        app.state.queue.close()


def test_the_run_history_outlives_the_server(tmp_path):
    """A restarted UI lists the earlier runs with their logs; one the server's end cut short reads "interrupted"."""
    import json
    import sys

    from musubi_tuner.ui.runs import RunQueue

    folder = tmp_path / "runs"
    q = RunQueue(folder, tmp_path)
    done = q.submit("x", "say hello", [sys.executable, "-c", "print('hello'); import sys; sys.exit(0)"])
    assert q.wait_idle(60) and done.state == "done"
    q.close()
    records = json.loads((folder / "runs.json").read_text())
    records.append({**records[0], "id": 2, "state": "running", "title": "cut short"})
    (folder / "runs.json").write_text(json.dumps(records))
    again = RunQueue(folder, tmp_path)
    assert [(r.id, r.state) for r in again.runs] == [(1, "done"), (2, "interrupted")]
    assert "hello" in again.runs[0].log and again.runs[0].public()["command"].startswith("python -c ")
    assert again.submit("x", "next", [sys.executable, "-c", "pass"]).id == 3
    assert again.wait_idle(60)
    again.close()


def test_edit_generation_takes_the_control_image(ui):
    ok(ui.post("/api/settings", json={"model_version": "edit-2511"}))
    view = ok(ui.post("/api/dataset/nano", json={"items": 2}))
    control = view["items"][0]["controls"][0]
    assert "give a control image" in error_of(ui.post("/api/generate", json={"prompt": "make it large"}))
    runs = ok(ui.post("/api/generate", json={"prompt": "make it large", "seed": 2, "controls": [control]}))["runs"]
    assert len(runs) == 1 and f"--control_image_path {control}" in runs[0]["command"]
    done = wait(ui, runs[0]["id"])
    assert done["state"] == "done" and len(done["results"]["images"]) == 1, done["log"][-3:]
