from PIL import Image

from diffmorpher.cli import main


def test_cli_writes_a_gif_with_the_requested_frames(tiny_sd_dir, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (24, 24), (255, 0, 0)).save(a)
    Image.new("RGB", (24, 24), (0, 0, 255)).save(b)
    out = tmp_path / "out" / "morph.gif"
    code = main([
        "morph", str(a), str(b), "--prompt-a", "red", "--prompt-b", "blue", "--out", str(out),
        "--model", str(tiny_sd_dir), "--frames", "4", "--set", "lora_steps=2",
        "--set", "num_inference_steps=3", "--set", 'perceptual_metric="pixel"',
        "--save-loras", str(tmp_path / "loras"),
    ])
    assert code == 0
    with Image.open(out) as gif:
        assert gif.n_frames == 4
    assert sorted(p.name for p in (tmp_path / "loras").iterdir()) == [
        "lora_0.safetensors", "lora_1.safetensors"
    ]


def test_cli_reports_bad_options_without_a_traceback(tiny_sd_dir, tmp_path, capsys):
    code = main(["morph", "a.png", "b.png", "--prompt-a", "x", "--prompt-b", "y",
                 "--model", str(tiny_sd_dir), "--set", "num_frames=0"])
    assert code == 2
    assert "num_frames must be between 2" in capsys.readouterr().err
