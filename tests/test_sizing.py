"""benchmarks.sizing: the FLOP counter on a real-size architecture (FakeTensorMode: no memory,
no time) and the morph's FLOPs following the pipeline's call counts."""

from __future__ import annotations

from benchmarks import sizing
from checkpoints.architectures import ARCHITECTURES
from diffmorpher.config import MorphConfig

SD21_BASE = ARCHITECTURES["sd21-base"]


def test_sd21_base_forward_and_lora_step_flops() -> None:
    flops = sizing.unet_flops(SD21_BASE, 512)
    assert 0.6e12 <= flops["forward"] <= 0.75e12  # ~0.68 TFLOP (multiply-add = 2 FLOPs)
    assert flops["forward"] < flops["lora_train_step"] < 3 * flops["forward"]


def test_morph_flops_scale_with_frames() -> None:
    unet = {"forward": 7, "lora_train_step": 20}
    vae = {"encode": 3, "decode": 5}
    base = MorphConfig()

    def total(frames: int, warm: bool = False) -> int:
        config = base.replace(num_frames=frames)
        return sizing.morph_flops(sizing.morph_calls(config, warm), unet, vae, 11)["total"]

    per_frame = (base.num_inference_steps + base.reschedule_probe_steps) * unet["forward"] + 2 * vae["decode"]
    assert total(17) - total(9) == 8 * per_frame
    assert total(17, warm=True) - total(9, warm=True) == 8 * per_frame
    # Cold adds the LoRA fit (both images) and the inversion (each image).
    cold_extra = base.lora_steps * 2 * unet["lora_train_step"] + base.num_inference_steps * 2 * unet["forward"]
    assert total(16) - total(16, warm=True) == cold_extra
    calls = sizing.morph_calls(base, warm=False)
    assert calls.frame_forwards == base.num_frames * base.num_inference_steps  # 2 images: N rows


def test_recommendation_fits_the_card() -> None:
    for card in sizing.CARDS_GB:
        rec = sizing.recommend(7.0, 0.8, card)
        assert rec["workers"] * (7.0 + sizing.RESERVE_GB + rec["frame_batch_size"] * 0.8) <= card
