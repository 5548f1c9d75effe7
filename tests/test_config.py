from pathlib import Path

import pytest

from diffmorpher.config import FAST_PRESET_OPTIONS, ConfigError, MorphConfig, OutputOptions


def test_defaults_are_the_papers():
    config = MorphConfig()
    assert (config.lora_rank, config.lora_steps, config.lora_lr) == (16, 200, 2e-4)
    assert (config.num_inference_steps, config.attn_lambda, config.attn_beta) == (50, 0.6, 0.0)
    assert config.use_adain and config.use_reschedule and config.use_lora
    assert config.num_frames == 16 and config.lora_mode == "interpolate"
    assert config.num_attn_replace_steps == 30


@pytest.mark.parametrize(
    "options, message",
    [
        ({"num_frames": 0}, "num_frames must be between 2"),
        ({"num_frames": 1.5}, "num_frames must be an integer"),
        ({"num_frames": True}, "num_frames must be an integer"),
        ({"attn_lambda": 1.5}, "attn_lambda must be in"),
        ({"lora_lr": 0}, "lora_lr must be in (0"),
        ({"lora_lr": float("nan")}, "lora_lr must be a finite number"),
        ({"use_adain": "yes"}, "use_adain must be true or false"),
        ({"dtype": "int8"}, "dtype must be one of"),
        ({"resolution": 100}, "multiple of 8"),
        ({"fixed_lora_alpha": 2}, "fixed_lora_alpha must be in"),
        ({"frames": 4}, "unknown option(s) ['frames']"),
        ({"preset": "turbo"}, "preset must be one of ['default', 'fast'], got 'turbo'"),
        ({"preset": 3}, "preset must be one of"),
    ],
)
def test_invalid_options_raise_a_specific_error(options, message):
    with pytest.raises(ConfigError) as error:
        MorphConfig.from_dict(options)
    assert message in str(error.value)


def test_modes():
    assert MorphConfig(use_lora=False).lora_mode == "none"
    assert MorphConfig(fixed_lora_alpha=0.5).lora_mode == "fixed"


def test_round_trip_through_dict():
    config = MorphConfig(num_frames=5, seed=3)
    assert MorphConfig.from_dict(config.to_dict()) == config


def test_output_options_validate():
    with pytest.raises(ConfigError):
        OutputOptions(format="bmp")
    with pytest.raises(ConfigError):
        OutputOptions(frame_duration_ms=0)


def test_a_preset_sets_its_options_beneath_the_explicit_ones():
    fast = MorphConfig.from_dict({"preset": "fast"})
    assert {key: getattr(fast, key) for key in FAST_PRESET_OPTIONS} == FAST_PRESET_OPTIONS
    assert MorphConfig.from_dict({"preset": "fast", "num_inference_steps": 30}).num_inference_steps == 30
    assert MorphConfig.from_dict({"preset": "default"}) == MorphConfig()



def test_the_options_import_without_torch() -> None:
    """Torch-free processes (the web page, clients) read MorphConfig itself, not a copy."""
    import subprocess
    import sys

    code = ("import sys; from diffmorpher import MorphConfig; from diffmorpher.config import PRESETS; "
            "print('torch' in sys.modules, MorphConfig().num_frames > 0, bool(PRESETS))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={"PATH": ""})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True", "True"]
