"""The CPU benchmarks' models behave as documented (small sizes): the fake-tensor memory estimate and the simulated
block-swap schedule, both running our real code."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))

import memory_estimate  # noqa: E402
import swap_schedule  # noqa: E402


def test_memory_estimate_accounts_for_weights_optimizer_and_activations():
    rows = {c: memory_estimate.estimate(c, layers=2, size=128, text_tokens=16, rank=16)
            for c in ("adamw", "adamw8bit", "fp8+adamw")}
    a, b, f = rows["adamw"], rows["adamw8bit"], rows["fp8+adamw"]
    assert a["peak_in"] == "backward"
    assert a["peak_gib"] > a["weights_gib"] + a["lora_gib"] + a["optimizer_gib"]
    # two fp32 moments per LoRA weight that gets a gradient (the last block's text-stream outputs get none)
    assert 0.8 * 2 * a["lora_gib"] < a["optimizer_gib"] < 2 * a["lora_gib"]
    assert b["optimizer_gib"] == pytest.approx(a["optimizer_gib"] / 4, rel=0.05)  # uint8 moments + absmax
    assert a["peak_gib"] - b["peak_gib"] == pytest.approx(a["optimizer_gib"] - b["optimizer_gib"], rel=0.01)
    assert f["weights_gib"] < 0.6 * a["weights_gib"]  # block Linears in one byte, the rest bf16


def test_memory_estimate_block_swap_holds_two_swapped_blocks():
    f, s = (memory_estimate.estimate(c, layers=6, size=128, text_tokens=16, rank=4, steps=1)
            for c in ("fp8+adamw", "fp8+swap4+adamw"))
    block = (f["weights_gib"] - s["weights_gib"]) / 4  # four of six blocks start in CPU memory
    assert block > 0.3  # one fp8 block of the 20B model: ~0.32 GiB
    # at most two of the four swapped blocks on the device at once
    assert f["peak_gib"] - 2 * block - 0.01 < s["peak_gib"] < f["peak_gib"] - 2 * block + 0.01


def test_swap_schedule_spread_layout_hides_copies_better():
    kw = dict(fwd_ms=7.0, bwd_ms=10.5, train=True)
    base = 60 * (2 * 7.0 + 10.5)
    assert swap_schedule.simulate("spread", 45, 0.0, **kw) == pytest.approx(base)  # free copies cost nothing
    end, spread = (swap_schedule.simulate(layout, 45, 14.0, **kw) for layout in ("end", "spread"))
    assert base < spread < end
    assert spread == pytest.approx(45 * 14.0 + 60 * (7.0 + 10.5), rel=0.01)  # forward bound by the copy engine
    assert swap_schedule.simulate("spread", 16, 14.0, **kw) == pytest.approx(base, rel=0.005)
