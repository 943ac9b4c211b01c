"""The web UI's server: a FastAPI app over one project folder and its run queue; the page is static/index.html.

Listens on 127.0.0.1 unless --host says otherwise (then with a warning: anyone who can reach the port can run
training and read the project's files)."""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from contextlib import asynccontextmanager
from pathlib import Path

from ..errors import UserError, describe_error
from .project import IMAGE_SUFFIXES, NANO_VERSIONS, Project
from .runs import RunQueue, python_module

STATIC = Path(__file__).parent / "static"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
logger = logging.getLogger(__name__)


def model_report(project: Project) -> dict:
    """Each model option resolved (ComfyUI folder, hub repo id) and checked from its header; the versions the DiT
    fits (the scripts' own check, version by version: Edit and Edit-2509 DiTs have the same keys as the original)."""
    from ..models.locate import cached_snapshot, fits, hub_patterns, is_repo_id, locate
    from ..models.registry import VERSIONS
    from ..qwen_image.model_files import expect

    version = project.version
    out: dict = {"nano": project.uses_nano(), "version": version.name, "files": {}, "ok": True}
    try:
        paths = project.model_paths()
    except UserError as e:
        return {**out, "ok": False, "error": str(e)}
    for kind in ("dit", "vae", "text_encoder"):
        value = paths[kind]
        entry = {"value": value}
        try:
            if is_repo_id(value) and cached_snapshot(value, hub_patterns(kind)) is None:
                entry.update(ok=False, download=value,
                             error=f"{value} is not in the Hugging Face cache yet: download it (queued as a run)")
                out["files"][kind], out["ok"] = entry, False
                continue
            path = locate(value, kind, version)
            info = expect(path, f"--{kind}", kind, version)
            entry.update(ok=True, path=path, what=info.describe())
            if kind == "dit":
                entry["detected"] = [name for name, v in VERSIONS.items() if fits(Path(path), "dit", v)]
        except UserError as e:
            entry.update(ok=False, error=str(e))
            out["ok"] = False
        out["files"][kind] = entry
    return out


def memory_plan(project: Project, gpu_gib: float) -> dict:
    from ..memory.estimate import plan
    from ..qwen_image.dit import infer_dit_config
    from ..qwen_image.model_files import expect

    from ..models.registry import family_of

    if not 1 <= gpu_gib <= 2048:
        raise UserError(f"GPU memory {gpu_gib} GiB: give the card's memory in GiB (e.g. 24)")
    if not family_of(project.version).memory_estimate:
        raise UserError(f"the memory plan does not cover {project.version.modelspec_arch} yet; see docs/memory.md")
    info = expect(project.model_paths()["dit"], "--dit", "dit", project.version)
    config = infer_dit_config(info.dit_shapes)
    layers = config.pop("num_layers")
    size = int(project.settings["dataset"]["resolution"])
    p = plan(gpu_gib, layers, max(16, size - size % 16), rank=int(project.settings["training"]["network_dim"]),
             dit_config=config)
    return {"fits": p.fits, "options": " ".join(p.options), "batch_size": p.batch_size,
            "estimate": {k: round(v, 2) for k, v in p.estimate.items()}, "tried": p.tried, "layers": layers,
            "resolution": size}


def read_csv(path: Path) -> list[dict]:
    from ..training.outputs import LossLog

    return LossLog(path, []).rows()


def run_results(project: Project, run) -> dict:
    """What a run produced so far: training's loss and validation curves and samples; generation's images."""
    info = run.info
    out: dict = {}
    if run.kind == "train":
        from ..training.outputs import loss_log_path, validation_log_path

        folder, name = Path(info["output_dir"]), info["output_name"]
        out["loss"] = [[int(r["step"]), float(r["loss"])] for r in read_csv(loss_log_path(folder, name))
                       if r.get("loss") not in (None, "")]
        out["validation"] = [[int(r["step"]), float(r["mean"])] for r in read_csv(validation_log_path(folder, name))
                             if r.get("mean") not in (None, "")]
        samples = sorted((folder / "sample").glob("*.png"), key=lambda p: p.stat().st_mtime)
        out["samples"] = [str(p) for p in samples]
        out["lora"] = str(folder / f"{name}.safetensors") if (folder / f"{name}.safetensors").is_file() else None
    if run.kind == "generate":  # layered: the composite first, then the layers
        out["images"] = [str(p) for p in sorted(Path(info["save_path"]).glob("*.png"),
                                                key=lambda p: ("_layer" in p.stem, p.name))]
    return out


def create_app(project_folder: Path, hosts: set[str] | None = None):
    """`hosts`: the Host header names the page may be reached by (default: localhost names; a request naming another
    host, as a DNS-rebinding page would, is refused)."""
    from fastapi import Body, FastAPI, HTTPException, Request
    from fastapi.responses import FileResponse, JSONResponse
    from fastapi.staticfiles import StaticFiles

    project = Project(project_folder)
    queue = RunQueue(project.folder / "runs", project.folder)
    lock = threading.Lock()

    @asynccontextmanager
    async def lifespan(_app):
        yield
        queue.close()

    app = FastAPI(title="Qwen-Image trainer", lifespan=lifespan)
    app.state.project, app.state.queue = project, queue

    allowed = (hosts or set()) | LOCAL_HOSTS | {"testserver"}

    @app.middleware("http")
    async def same_machine_only(request: Request, call_next):
        """Another web page open in the browser must not drive the UI: the Host must be one of ours (no DNS
        rebinding) and actions must be JSON (a cross-site form cannot send it without a CORS preflight, which this
        server does not answer)."""
        host = (request.headers.get("host") or "").rsplit(":", 1)[0].strip("[]")
        if host not in allowed:
            return JSONResponse({"error": f"host {host!r} is not this UI's address"}, status_code=403)
        if request.method == "POST" and not request.headers.get("content-type", "").startswith("application/json"):
            return JSONResponse({"error": "actions are JSON requests"}, status_code=415)
        return await call_next(request)

    @app.exception_handler(UserError)
    async def user_error(_request: Request, e: UserError):
        return JSONResponse({"error": str(e)}, status_code=400)

    @app.get("/")
    def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/api/state")
    def state():
        from ..models.registry import VERSIONS

        return {"settings": project.settings, "versions": list(VERSIONS), "nano_versions": list(NANO_VERSIONS),
                "project": str(project.folder), "gpu": gpu_memory_gib()}

    @app.post("/api/settings")
    def settings(new: dict = Body(...)):
        with lock:
            return {"settings": project.update(new)}

    @app.get("/api/models")
    def models():
        return model_report(project)

    @app.post("/api/models/download")
    def download(repo: str = Body(..., embed=True)):
        from ..models.locate import is_repo_id

        if not is_repo_id(repo):
            raise UserError(f"{repo!r} is not a Hugging Face repo id (org/name)")
        run = queue.submit("download", f"download {repo}", python_module("musubi_tuner.models.locate", repo))
        return run.public()

    @app.post("/api/dataset/nano")
    def nano_dataset(items: int = Body(48, embed=True)):
        if not 1 <= items <= 1000:
            raise UserError(f"items {items}: give 1 to 1000")
        with lock:
            project.nano_dataset(items)
        return project.dataset_view()

    @app.get("/api/dataset")
    def dataset():
        return project.dataset_view()

    @app.post("/api/dataset/caption")
    def caption(image: str = Body(...), caption: str = Body(...)):
        return {"saved": str(project.save_caption(image, caption))}

    @app.post("/api/dataset/autocaption")
    def autocaption(overwrite: bool = Body(False, embed=True)):
        return {"runs": [queue.submit("caption", title, argv).public()
                         for title, argv in project.caption_commands(overwrite)]}

    @app.post("/api/memory")
    def memory(gpu_gib: float = Body(..., embed=True)):
        return memory_plan(project, gpu_gib)

    @app.post("/api/train")
    def train(resume: bool = Body(False, embed=True), cache: bool = Body(True, embed=True)):
        with lock:
            state_folder = None
            if resume:
                state_folder = project.latest_state()
                if state_folder is None:
                    raise UserError(f"nothing to resume: no state folder in {project.output_dir()} (states are saved "
                                    "at every save step and when a run is stopped)")
            runs = [queue.submit(kind, title, argv).public() for kind, title, argv in project.caching_commands()] \
                if cache else []
            t = project.settings["training"]
            argv = project.training_command(str(state_folder) if state_folder else None)
            run = queue.submit("train", f"train {t['output_name']}" + (" (resumed)" if resume else ""), argv,
                               output_dir=str(project.output_dir()), output_name=t["output_name"])
        return {"runs": [*runs, run.public()]}

    @app.post("/api/generate")
    def generate(prompt: str = Body(""), seed: int = Body(1), lora: str | None = Body(None),
                 multiplier: float = Body(1.0), controls: list[str] = Body([])):
        """Before / after: the same prompt, seed (and control images) without and with the LoRA."""
        version = project.version
        if not prompt.strip() and not (version.layer_targets and controls):
            raise UserError("give a prompt")
        if version.controls == "required" and not controls:
            raise UserError(f"{version.name} edits an image: give a control image")
        if lora and not Path(lora).is_file():
            raise UserError(f"LoRA {lora}: file not found (train first, or give the path of a LoRA file)")
        for c in controls:
            if not Path(c).is_file():
                raise UserError(f"control image {c}: file not found")
        n = len(queue.runs) + 1
        out = project.folder / "generated" / f"{n:04d}"
        runs = [queue.submit("generate", f"generate (base) seed {seed}",
                             project.generation_command(prompt, seed, out / "base", None, controls=controls),
                             save_path=str(out / "base"),
                             side="base", group=n)]
        if lora:
            runs.append(queue.submit("generate", f"generate (LoRA) seed {seed}",
                                     project.generation_command(prompt, seed, out / "lora", lora, multiplier, controls),
                                     save_path=str(out / "lora"), side="lora", group=n))
        return {"runs": [r.public() for r in runs]}

    @app.post("/api/tool")
    def tool(name: str = Body(...), lora: str = Body(...), output: str = Body(""), files: list[str] = Body([])):
        """convert (to diffusers), ema (post-hoc EMA of the run's checkpoints) or merge (into the DiT)."""
        argv = project.tool_command(name, lora, output, files)
        return queue.submit(name, f"{name} {Path(lora).name}", argv).public()

    @app.get("/api/runs")
    def runs():
        return {"runs": [r.public() for r in queue.runs]}

    @app.get("/api/runs/{run_id}")
    def run_detail(run_id: int):
        run = queue.get(run_id)
        if run is None:
            raise HTTPException(404, f"no run {run_id}")
        return {**run.public(log_lines=200), "results": run_results(project, run)}

    @app.post("/api/runs/{run_id}/stop")
    def stop(run_id: int):
        run = queue.stop(run_id)
        if run is None:
            raise HTTPException(404, f"no run {run_id}")
        return run.public()

    @app.get("/api/image")
    def image(path: str):
        p = Path(path).resolve()
        if p.suffix.lower() not in IMAGE_SUFFIXES or not p.is_file():
            raise HTTPException(404, "not an image")
        if not any(p.is_relative_to(root.resolve()) for root in project.image_folders()):
            raise HTTPException(403, "outside the project and dataset folders")
        return FileResponse(p, headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def gpu_memory_gib() -> float | None:
    try:
        import torch

        if torch.cuda.is_available():
            return round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    except Exception:  # noqa: BLE001 - no GPU information
        pass
    return None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen-image-ui", description="The local web UI: from a folder of images to a "
                                "trained, tested LoRA. Opens on the nano models when no model files are set.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--project", default="qwen-image-project", help="the project folder (settings, dataset config, "
                   "caches, outputs, run logs); created when missing")
    return p


def main(argv=None) -> None:
    from ..errors import cli_main

    @cli_main
    def run(argv=None):
        args = build_parser().parse_args(argv)
        if not 1 <= args.port <= 65535:
            raise UserError(f"--port {args.port}: give 1 to 65535")
        if args.host not in LOCAL_HOSTS:
            print(f"warning: --host {args.host}: the UI is reachable from other machines; anyone who can reach port "
                  f"{args.port} can run training and read the project's files", file=sys.stderr)
        import uvicorn

        try:
            app = create_app(Path(args.project), {args.host})
        except OSError as e:
            raise UserError(f"--project {args.project}: {describe_error(e)}") from None
        print(f"Qwen-Image UI: http://{'localhost' if args.host in LOCAL_HOSTS else args.host}:{args.port} "
              f"(project {Path(args.project).resolve()}); Ctrl-C stops it", flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")

    run(argv)
