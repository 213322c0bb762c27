"""bench/memory_estimate.py and bench/loop_memory.py against independent counts; bench/train_memory.py's CPU smoke run."""

import json
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import loop_memory  # noqa: E402
import memory_estimate  # noqa: E402
import train_memory  # noqa: E402

from sdtune.models import SD15_TEXT_ENCODER_PARAMS, SD15_UNET_PARAMS, SD15_VAE_PARAMS  # noqa: E402


def test_static_memory_of_full_unet_training_is_weights_gradients_and_two_moments():
    row = memory_estimate.estimate("unet", "default", lora_rank=16)
    gib = 2**30
    assert row["trainable_parameters"] == SD15_UNET_PARAMS
    assert row["weights_gib"] == pytest.approx(4 * SD15_UNET_PARAMS / gib)  # fp32, no buffers to speak of
    assert row["gradients_gib"] == pytest.approx(4 * SD15_UNET_PARAMS / gib)
    assert row["optimizer_state_gib"] == pytest.approx(8 * SD15_UNET_PARAMS / gib)


def test_frozen_encoders_are_off_the_gpu_and_trained_ones_are_fp32():
    gib = 2**30
    lora = memory_estimate.estimate("lora", "low", lora_rank=16)
    assert lora["weights_gib"] == pytest.approx((2 * SD15_UNET_PARAMS + 4 * 3_188_736) / gib)  # bf16 U-Net, fp32 adapters
    everything = memory_estimate.estimate("unet+vae+text", "low", lora_rank=16)
    total = SD15_UNET_PARAMS + SD15_VAE_PARAMS + SD15_TEXT_ENCODER_PARAMS
    assert everything["weights_gib"] == pytest.approx(4 * total / gib, rel=1e-3)  # (+ the text encoder's position ids)


def test_8bit_state_bytes_equal_what_bitsandbytes_allocates(tiny_model):
    bnb = pytest.importorskip("bitsandbytes")
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    params = list(unet.parameters())
    optimizer = bnb.optim.AdamW8bit(params, lr=1e-4)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    # distinct storages: the quantisation maps (qmap1/2, 2 KiB) are one tensor shared by every parameter
    tensors = {t.data_ptr(): t for state in optimizer.state.values() for t in state.values()
               if isinstance(t, torch.Tensor) and t.numel() > 1}  # (not the step counter)
    shared_maps = 2 * 256 * 4
    allocated = sum(t.numel() * t.element_size() for t in tensors.values()) - shared_maps
    assert memory_estimate.optimizer_state_bytes(params, eight_bit=True) == allocated
    assert allocated < memory_estimate.optimizer_state_bytes(params, eight_bit=False)


def test_memory_estimate_tiny_writes_every_strategy_and_profile(tmp_path, capsys):
    output = tmp_path / "estimate.json"
    record = memory_estimate.main(["--tiny", "--output", str(output)])
    assert json.loads(output.read_text()) == json.loads(json.dumps(record))
    assert len(record["results"]) == 22
    by = {(r["strategy"], r["profile"]): r for r in record["results"]}
    assert by[("unet", "low")]["optimizer_state_gib"] < by[("unet", "default")]["optimizer_state_gib"]
    low, default = by[("unet+vae+text", "low")], by[("unet+vae+text", "default")]
    assert low["headroom_paged_gib"] == pytest.approx(low["headroom_gib"] + low["optimizer_state_gib"])
    assert default["headroom_paged_gib"] is None  # plain AdamW's state is not paged
    assert "headroom in 12 GiB" in capsys.readouterr().out


@pytest.mark.slow
def test_train_memory_tiny_runs_the_low_profile_and_reuses_earlier_runs(tiny_model, tmp_path, monkeypatch):
    output = tmp_path / "train_memory.json"
    train_memory.main(["--tiny", "--model-dir", str(tiny_model), "--strategies", "lora", "unet+vae+text",
                       "--steps", "2", "--output", str(output)])
    record = json.loads(output.read_text())
    assert record["status"] == "complete" and record["settings"]["profiles"] == {"low": ["--memory_profile", "low"]}
    assert [r["strategy"] for r in record["results"]] == ["lora", "unet+vae+text"]
    assert record["settings"]["ballast"] is True
    for row in record["results"]:
        assert row["error"] is None and row["optimizer"] == "bitsandbytes AdamW8bit"
        assert row["ballast_gib"] == 0.0  # a CPU holds no ballast
    assert record["results"][0]["encoded_once"]["latents"].startswith("4 images")  # frozen VAE: cached
    assert "the VAE trains" in record["results"][1]["encoded_once"]["latents"]

    # --reuse: a second run measures only what the first did not (same device and settings)
    runs = []
    toolkit_run = train_memory.toolkit_run
    monkeypatch.setattr(train_memory, "toolkit_run", lambda **kw: runs.append(kw["strategy"]) or toolkit_run(**kw))
    again = tmp_path / "again" / "train_memory.json"
    train_memory.main(["--tiny", "--model-dir", str(tiny_model), "--strategies", "unet+vae+text", "bitfit",
                       "--steps", "2", "--reuse", str(tmp_path), "--output", str(again)])
    assert runs == ["bitfit"]
    rows = json.loads(again.read_text())["results"]
    assert rows[0] == {**record["results"][1], "reused_from": str(output)} and rows[1]["strategy"] == "bitfit"
    runs.clear()
    train_memory.main(["--tiny", "--model-dir", str(tiny_model), "--strategies", "lora", "--steps", "3",
                       "--reuse", str(output), "--output", str(tmp_path / "other.json")])
    assert runs == ["lora"]  # other settings (3 steps): measured again


def test_live_bytes_counts_new_storages_until_they_die_and_not_views():
    layer = torch.nn.Linear(256, 512)
    with loop_memory.LiveBytes() as counter:
        x = torch.randn(8, 256)  # 8 KiB
        y = layer(x)  # 16 KiB; the weight's transpose inside is a view of memory made before the mode
        y.t()  # a view: nothing new
        peak = counter.now
        del x, y
    assert peak == (8 * 256 + 8 * 512) * 4
    assert counter.now == 0 and counter.peak == peak


@pytest.mark.parametrize("profile", [["--memory_profile", "low"], []])
def test_loop_memory_left_after_training_is_exactly_the_optimizer_state(profile, tiny_model, tmp_path):
    """What the loop still holds after its last step (gradients are freed) is the optimizer state,
    which memory_estimate counts independently (checked against bitsandbytes above)."""
    from common import write_image_folder

    images = write_image_folder(tmp_path / "images", 4, 64)
    row = loop_memory.measure(tiny_model, images, "unet", 64, 2, profile, tmp_path / "run")
    params = list(UNet2DConditionModel.from_pretrained(tiny_model / "unet").parameters())
    state = memory_estimate.optimizer_state_bytes(params, eight_bit=bool(profile))
    assert row["loop_live_at_end_gib"] * 2**30 == state
    # during the loop: the state, a full set of fp32 gradients and the activations on top
    assert row["loop_peak_gib"] * 2**30 > state + 4 * sum(p.numel() for p in params)
    assert row["trained_weights_gib"] * 2**30 == 4 * sum(p.numel() for p in params)
    assert row["estimated_peak_gib"] == pytest.approx(row["loop_peak_gib"] + row["trained_weights_gib"])
    assert row["optimizer"] == ("bitsandbytes AdamW8bit" if profile else "torch AdamW")


def test_ballast_leaves_exactly_the_budget_free():
    gib = 2**30
    assert train_memory.ballast_bytes(80 * gib, 11.5) == int(68.5 * gib)  # an 80 GiB card acting as a 12 GiB one
    assert train_memory.ballast_bytes(10 * gib, 11.5) == 0  # already smaller than the budget: nothing held


def test_loop_memory_records_a_refused_strategy_and_goes_on(tiny_model, tmp_path):
    output = tmp_path / "loop.json"
    record = loop_memory.main(["--tiny", "--model-dir", str(tiny_model), "--strategies", "bitfit", "lora",
                               "--output", str(output), "--toolkit-args", "--mixed_precision", "bf16"])
    bitfit, lora = record["results"]
    assert "needs a GPU" in bitfit["error"]  # BitFit refuses bf16 on a CPU
    assert lora["loop_peak_gib"] > 0 and "error" not in lora
    assert json.loads(output.read_text())["results"] == record["results"]
