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
    # The saved LoRAs (diffusers format) taken back instead of fitting: the same GIF.
    again = tmp_path / "out" / "again.gif"
    code = main([
        "morph", str(a), str(b), "--prompt-a", "red", "--prompt-b", "blue", "--out", str(again),
        "--model", str(tiny_sd_dir), "--frames", "4", "--set", "lora_steps=2",
        "--set", "num_inference_steps=3", "--set", 'perceptual_metric="pixel"',
        "--lora", f"0={tmp_path / 'loras' / 'lora_0.safetensors'}",
        "--lora", f"1={tmp_path / 'loras' / 'lora_1.safetensors'}",
    ])
    assert code == 0 and again.read_bytes() == out.read_bytes()


def test_cli_reports_a_bad_lora_without_a_traceback(tiny_sd_dir, tmp_path, capsys):
    (tmp_path / "bad.safetensors").write_bytes(b"not a LoRA")
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    Image.new("RGB", (24, 24), (255, 0, 0)).save(a)
    Image.new("RGB", (24, 24), (0, 0, 255)).save(b)
    code = main(["morph", str(a), str(b), "--prompt-a", "x", "--prompt-b", "y",
                 "--model", str(tiny_sd_dir), "--lora", f"0={tmp_path / 'bad.safetensors'}"])
    assert code == 2
    assert "field '--lora 0' is not a safetensors file (10 bytes" in capsys.readouterr().err


def test_cli_reports_bad_options_without_a_traceback(tiny_sd_dir, tmp_path, capsys):
    code = main(["morph", "a.png", "b.png", "--prompt-a", "x", "--prompt-b", "y",
                 "--model", str(tiny_sd_dir), "--set", "num_frames=0"])
    assert code == 2
    assert "num_frames must be between 2" in capsys.readouterr().err


def test_cli_writes_png_frames_into_a_directory_and_one_file_otherwise(tmp_path):
    """`--out frames` (no suffix) is a directory of frame PNGs, as in `python -m client`; a
    suffix picks the single-file format (morph_protocol.formats)."""
    from diffmorpher.cli import _write_parts, build_parser, _output_format
    from diffmorpher.config import OutputOptions
    from diffmorpher.encoding import encode_parts

    frames = [Image.new("RGB", (8, 8), (i * 60, 0, 0)) for i in range(3)]
    out = tmp_path / "out" / "frames"
    args = build_parser().parse_args(["morph", "a.png", "b.png", "--out", str(out)])
    assert _output_format(args) == "png"
    _write_parts(encode_parts(frames, OutputOptions(format="png")), out, "png")
    assert sorted(p.name for p in out.iterdir()) == ["frame_000.png", "frame_001.png", "frame_002.png"]
    with Image.open(out / "frame_002.png") as frame:
        assert frame.getpixel((0, 0)) == (120, 0, 0)
    archive = tmp_path / "frames.zip"
    args = build_parser().parse_args(["morph", "a.png", "b.png", "--out", str(archive)])
    _write_parts(encode_parts(frames, OutputOptions(format=_output_format(args))), archive, "frames-zip")
    assert archive.read_bytes()[:2] == b"PK"
