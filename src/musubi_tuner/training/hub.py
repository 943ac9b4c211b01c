"""The Hugging Face Hub in training, as musubi-tuner's options define it: upload each saved checkpoint (and, with
--save_state_to_huggingface, each state folder) to --huggingface_repo_id, and resume from a state stored there
(--resume REPO_ID/PATH[:REVISION[:REPO_TYPE]] --resume_from_huggingface).

An upload that fails is logged and training goes on: the files are on disk. With --async_upload, uploads run in
background threads; the run waits for them before it returns, so none is cut off.
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path

from ..errors import UserError

logger = logging.getLogger(__name__)

REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def check_hub_options(args) -> None:
    """Before any model loads: the options fit together."""
    repo = args.huggingface_repo_id
    if repo is not None and not REPO_ID.match(repo):
        raise UserError(f"--huggingface_repo_id {repo}: give user/name (or organisation/name)")
    for flag in ("save_state_to_huggingface", "async_upload", "huggingface_path_in_repo",
                 "huggingface_repo_visibility"):
        if getattr(args, flag) and repo is None:
            raise UserError(f"--{flag} needs --huggingface_repo_id")
    if args.resume_from_huggingface:
        if not args.resume:
            raise UserError("--resume_from_huggingface needs --resume REPO_ID/PATH[:REVISION[:REPO_TYPE]]")
        parse_resume(args.resume)


def parse_resume(spec: str) -> tuple[str, str, str | None, str]:
    """REPO_ID/PATH[:REVISION[:REPO_TYPE]] -> (repo_id, path, revision, repo_type), as musubi-tuner reads it."""
    parts = spec.split(":")
    owner, name, path = (parts[0].split("/", 2) + ["", ""])[:3]
    if len(parts) > 3 or not REPO_ID.match(f"{owner}/{name}") or not path.strip("/"):
        raise UserError(f"--resume {spec}: with --resume_from_huggingface give REPO_ID/PATH[:REVISION[:REPO_TYPE]], "
                        "e.g. me/my-lora/my_lora-step00001000-state:main:model")
    repo_type = parts[2] if len(parts) == 3 else "model"
    if repo_type not in ("model", "dataset", "space"):
        raise UserError(f"--resume {spec}: repository type {repo_type!r} is not model, dataset or space")
    return f"{owner}/{name}", path.strip("/"), (parts[1] or None) if len(parts) > 1 else None, repo_type


def download_state(args) -> Path:
    """The state folder of --resume on the Hub, downloaded (into the Hugging Face cache) -> its local path."""
    from huggingface_hub import snapshot_download

    repo_id, path, revision, repo_type = parse_resume(args.resume)
    logger.info("downloading the state %s from %s (%s)", path, repo_id, revision or "main")
    try:
        root = snapshot_download(repo_id, repo_type=repo_type, revision=revision, token=args.huggingface_token,
                                 allow_patterns=[f"{path}/*"])
    except Exception as e:  # network, authentication or missing repository: the run cannot resume
        raise UserError(f"--resume {args.resume}: cannot download it from the Hub ({type(e).__name__}: {e})") from None
    folder = Path(root) / path
    if not folder.is_dir():
        raise UserError(f"--resume {args.resume}: {repo_id} has no folder {path}")
    return folder


class Uploader:
    """Uploads saved files and folders to --huggingface_repo_id; does nothing without it."""

    def __init__(self, args):
        self.args = args
        self.enabled = args.huggingface_repo_id is not None
        self.threads: list[threading.Thread] = []
        self.failed: list[str] = []
        self._api = None
        self._lock = threading.Lock()

    def _connect(self):
        with self._lock:
            if self._api is not None:
                return self._api
            from huggingface_hub import HfApi

            a = self.args
            api = HfApi(token=a.huggingface_token)
            api.create_repo(a.huggingface_repo_id, repo_type=a.huggingface_repo_type, exist_ok=True,
                            private=a.huggingface_repo_visibility != "public")
            self._api = api
            return api

    def upload(self, path: Path, state: bool = False) -> None:
        """A checkpoint file, or a state folder (with --save_state_to_huggingface), under the same name."""
        if not self.enabled or (state and not self.args.save_state_to_huggingface):
            return
        a = self.args
        dest = "/".join(p for p in ((a.huggingface_path_in_repo or "").strip("/"), path.name) if p)

        def run():
            try:
                api = self._connect()
                kw = dict(repo_id=a.huggingface_repo_id, repo_type=a.huggingface_repo_type, path_in_repo=dest)
                if path.is_dir():
                    api.upload_folder(folder_path=str(path), **kw)
                else:
                    api.upload_file(path_or_fileobj=str(path), **kw)
                logger.info("uploaded %s to %s/%s", path.name, a.huggingface_repo_id, dest)
            except Exception as e:  # the files are on disk: training goes on
                self.failed.append(path.name)
                logger.error("upload of %s to %s failed (%s: %s); the file is kept in %s", path.name,
                             a.huggingface_repo_id, type(e).__name__, e, path.parent)

        if a.async_upload:
            t = threading.Thread(target=run, name=f"upload {path.name}")
            t.start()
            self.threads.append(t)
        else:
            run()

    def finish(self) -> None:
        """Wait for the background uploads."""
        for t in self.threads:
            t.join()
        self.threads.clear()
        if self.failed:
            logger.warning("%d upload(s) failed: %s", len(self.failed), ", ".join(self.failed))
