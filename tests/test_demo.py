"""README command one: the demo teaches the shipped nano model a concept it has never seen, and the judge sees it.

This is also the learning check of the text-to-image path: the score on the new concept must rise from near zero to a
stated bound, which a wrong loss target sign, timestep scale or LoRA scale prevents (each was broken on purpose in a
scratch run: see docs/nano.md)."""

import json

import pytest
from PIL import Image

from musubi_tuner.demo import main as demo_main

# measured with the shipped models and these settings (seeded; purple 42% -> 100%, old 83%): see docs/nano.md
NEW_BEFORE_AT_MOST = 0.5
NEW_AFTER_AT_LEAST = 0.8
OLD_AFTER_AT_LEAST = 0.6


def test_demo_teaches_the_nano_model_purple(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = demo_main(["--output", "demo", "--samples", "12"])  # a relative folder, as a user types it
    out = capsys.readouterr().out
    before, after = result["before"], result["after"]
    print(json.dumps({"before": before, "after": after}))
    assert before["new"]["main"] <= NEW_BEFORE_AT_MOST
    assert after["new"]["main"] >= NEW_AFTER_AT_LEAST
    assert after["old"]["main"] >= OLD_AFTER_AT_LEAST
    grid = Image.open(result["grid"])
    assert grid.width > 4 * 2 * 64 and grid.height > 5 * 64
    scores = json.loads((tmp_path / "demo" / "original" / "scores.json").read_text())
    assert scores["after"] == after
    assert "new concept" in out and "old concepts" in out and "qwen_image_train_network" in out
    # the dataset config and the printed commands hold absolute paths: they work from any folder
    config = (tmp_path / "demo" / "original" / "data" / "dataset.toml").read_text()
    assert f'image_directory = "{tmp_path}' in config
    assert str(tmp_path / "demo" / "original" / "lora") in out


# the edit and layered families: shorter runs (150 LoRA steps, 8 judged generations); bounds from seeded runs with
# these settings (measured: layered diamonds 0% -> 94%, old shapes 94%; edit-2511 "make it large" 0% -> 62%, old
# edits 75%); see docs/nano.md
STORY_BOUNDS = {"layered": (0.2, 0.75, 0.6), "edit-2511": (0.2, 0.4, 0.4)}


@pytest.mark.parametrize("version", list(STORY_BOUNDS))
def test_demo_teaches_the_edit_and_layered_models(tmp_path, version):
    new_before_at_most, new_after_at_least, old_after_at_least = STORY_BOUNDS[version]
    result = demo_main(["--version", version, "--output", str(tmp_path / "demo"), "--samples", "8", "--steps", "150"])
    before, after = result["before"], result["after"]
    print(version, json.dumps({"before": before, "after": after}))
    assert before["new"]["main"] <= new_before_at_most
    assert after["new"]["main"] >= new_after_at_least
    assert after["old"]["main"] >= old_after_at_least
    assert Image.open(result["grid"]).width > 2 * 4 * 64
    # the printed "generate with it" command runs as it is: the control image (edit) or the image to decompose
    # (layered) and the guidance the judge scored with are in it
    from musubi_tuner.qwen_image_generate_image import main as generate_main

    command = result["generate"]
    assert "--control_image_path" in command and command[command.index("--guidance_scale") + 1] == "1"
    saved = generate_main(command)
    assert saved and all(Image.open(p).size == (64, 64) for p in saved)
