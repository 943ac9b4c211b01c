"""One model-family interface: the shared code (dataset, caching, training, sampling, generation, metadata, tools)
asks the family or reads the version's data, never which model it is; a new family is its own package plus one
registry line."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

from safetensors import safe_open

from musubi_tuner.models import registry

SRC = Path(__file__).resolve().parents[1] / "src" / "musubi_tuner"
FAMILY_PACKAGES = {"qwen_image", "qwen_image_21"}
# asking which model it is: version predicates, template / name comparisons, a family's name, 2.1 by its name
VERSION_TEST = re.compile(r"\.is_(v21|edit|layered)\b|\bis_(edit|layered)\(|\.template\s*(==|!=|in)\s|"
                          r"version\.name\s*(==|!=|in)\s|\.family\s*(==|!=)\s*[\"']|[\"']2\.1[\"']|\bv21\b")


def version_tests_outside_families() -> list[str]:
    hits = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        if rel.parts[0] in FAMILY_PACKAGES or rel == Path("models/registry.py"):
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if VERSION_TEST.search(line.split("#")[0]):
                hits.append(f"{rel}:{n}: {line.strip()}")
    return hits


def test_no_code_outside_the_family_packages_asks_which_model_it_is():
    assert version_tests_outside_families() == []


def test_the_scan_finds_a_branch_when_there_is_one():
    assert VERSION_TEST.search("if version.is_v21:") and VERSION_TEST.search('if version.name == "layered":')
    assert VERSION_TEST.search('guidance = 1.0 if v.template == "v21" else 4.0')
    assert not VERSION_TEST.search("if version.layer_targets:") and not VERSION_TEST.search("version.uses_controls")


def test_every_version_is_served_by_its_family():
    for name, version in registry.VERSIONS.items():
        family = registry.family_of(version)
        assert family.name == version.family, name
        assert registry.resolve_version(name) is version


TOY_VERSIONS = '''
from musubi_tuner.models.version import ModelVersion

VERSIONS = (ModelVersion("toy", "toy", "t2i", "toy", "toy_image", "Toy-Image", default_guidance=1.0),)
'''
TOY_FAMILY = '''
from musubi_tuner.qwen_image.family import QwenImageFamily

CALLS = []


class ToyFamily(QwenImageFamily):
    """A family that runs on Qwen-Image's architecture with its own version data and its own default steps."""

    name = "toy"

    def default_steps(self, args, version):
        return 3

    def accepts_file(self, info):
        return info.family == "qwen_image"

    def per_sample_loss(self, *a, **k):
        CALLS.append("loss")
        return super().per_sample_loss(*a, **k)


FAMILY = ToyFamily()
'''


def test_a_third_family_is_its_own_package_plus_one_registry_line(tmp_path, monkeypatch):
    """A package with versions.py and family.py, and one line in registry.FAMILIES: caching, training (LoRA metadata,
    cache names) and generation (its default steps) run on it with no other file changed."""
    from conftest import make_cached_dataset, train_args

    from musubi_tuner.qwen_image_generate_image import main as generate_main
    from musubi_tuner.qwen_image_train_network import main as train_main

    pkg = tmp_path / "toy_family"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "versions.py").write_text(textwrap.dedent(TOY_VERSIONS))
    (pkg / "family.py").write_text(textwrap.dedent(TOY_FAMILY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(registry.FAMILIES, "toy", "toy_family")  # the one registry line
    for name, version in registry._versions().items():
        monkeypatch.setitem(registry.VERSIONS, name, version)

    models, toml = make_cached_dataset(tmp_path / "run", "toy", n=2)
    caches = sorted(p.name for p in (tmp_path / "run" / "cache").iterdir())
    assert caches and all("_toy" in n for n in caches), caches
    out = tmp_path / "out"
    train_main(train_args(models, toml, out, "toy", "--network_module", "networks.lora_qwen_image", "--network_dim",
                          "4", "--max_train_steps", "2", "--learning_rate", "1e-3"))
    import toy_family.family as toy

    assert toy.CALLS.count("loss") == 2
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        md = f.metadata()
    assert md["ss_base_model_version"] == "toy_image" and md["ss_model_version"] == "toy"
    assert md["modelspec.architecture"] == "Toy-Image/lora"

    saved = generate_main(["--dit", str(models["dit"]), "--vae", str(models["vae"]), "--text_encoder",
                           str(models["text_encoder"]), "--model_version", "toy", "--prompt", "a red circle",
                           "--image_size", "64", "64", "--save_path", str(tmp_path / "gen"), "--device", "cpu",
                           "--lora_weight", str(out / "lora.safetensors")])
    from PIL import Image

    info = Image.open(saved[0]).text
    assert info["model_version"] == "toy" and info["infer_steps"] == "3" and info["guidance_scale"] == "1.0"
