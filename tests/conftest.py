import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """The embedded tiny model set (ComfyUI single-file layouts + tokenizer folder)."""
    from musubi_tuner.qwen_image.tiny import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("tiny"))
