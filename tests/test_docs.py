"""The documentation holds together: every relative link resolves (files and #anchors), every page is reachable from
the index, and every option the docs mention exists in a script (so a renamed option cannot leave stale docs)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(m[1]) for m in re.finditer(r"^#+\s+(.+)$", text, flags=re.M)}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: link to {target} points nowhere"
        if anchor:
            assert dest.suffix == ".md" and anchor in anchors(dest), f"{page.name}: no heading #{anchor} in {dest.name}"


def test_every_docs_page_is_linked_from_the_index():
    index = (ROOT / "docs" / "README.md").read_text()
    for page in (ROOT / "docs").glob("*.md"):
        if page.name != "README.md":
            assert f"]({page.name})" in index, f"docs/README.md does not link {page.name}"
    assert "](docs/README.md)" in (ROOT / "README.md").read_text()


def test_documented_options_exist():
    from musubi_tuner import qwen_image_cache_latents, qwen_image_cache_text_encoder_outputs
    from musubi_tuner import caption_images_by_qwen_vl, lora_post_hoc_ema, merge_lora, qwen_extract_lora
    from musubi_tuner import qwen_image_generate_image, qwen_image_train, qwen_image_train_network
    from musubi_tuner.generation.prompts import _LINE_OPTIONS

    known = set()
    for mod in (qwen_image_cache_latents, qwen_image_cache_text_encoder_outputs, qwen_image_generate_image,
                qwen_image_train, qwen_image_train_network, lora_post_hoc_ema, merge_lora, qwen_extract_lora,
                caption_images_by_qwen_vl):
        known |= {s for a in mod.build_parser()._actions for s in a.option_strings}
    from musubi_tuner import demo
    from musubi_tuner.nano.__main__ import build_parser as nano_parser
    from musubi_tuner.ui.server import build_parser as ui_parser

    known |= {s for a in ui_parser()._actions for s in a.option_strings}

    known |= {"--input", "--output", "--target"}  # convert_lora.py
    known |= {s for a in demo._parser()._actions for s in a.option_strings}
    nano = nano_parser()
    known |= {s for sub in nano._subparsers._group_actions[0].choices.values() for a in sub._actions
              for s in a.option_strings}
    known |= {f"--{k}" for k in _LINE_OPTIONS}  # prompt-line switches
    accelerate = {"--num_cpu_threads_per_process", "--multi_gpu", "--num_processes", "--num_machines",
                  "--dynamo_backend", "--cpu", "--config_file", "--mixed_precision"}
    other_tools = {"--i", "--cn", "--g", "--logdir"}  # other models' prompt switches (named as ignored), tensorboard
    bench = Path(__file__).parents[1] / "bench"  # the benchmark scripts' own options
    known |= {o for f in bench.glob("*.py") for o in re.findall(r'add_argument\("(--[a-z][a-z0-9_]*)"', f.read_text())}
    for page in PAGES:
        for option in set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_]*", page.read_text())):
            if option.endswith("_"):  # a family such as --metadata_*
                assert any(k.startswith(option) for k in known), f"{page.name} mentions {option}*, which no script has"
            else:
                assert option in known | accelerate | other_tools, f"{page.name} mentions {option}, which no script has"
