"""README command (a): the embedded-default main job runs end to end."""

from musubi_tuner.demo import main as demo_main


def test_demo_main_job(tmp_path, capsys):
    result = demo_main(["--output", str(tmp_path / "demo"), "--steps", "30"])
    out = capsys.readouterr().out
    assert result["final"].exists() and result["loss_log"].exists()
    assert len(result["loss_log"].read_text().splitlines()) == 31  # header + one line per step
    assert [p.suffix for p in result["before"]] == [".safetensors", ".png"] and result["after"][1].exists()
    assert len(list(result["sample_dir"].glob("*.png"))) >= 2
    assert "latent MSE to the mean training image" in out and "images before / after" in out
