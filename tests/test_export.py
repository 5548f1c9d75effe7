"""export/build_mar.py: the archive's model-config comes from MorphConfig and config.properties,
only servable SD folders are accepted, and only the weights the morph loads are shipped."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from diffmorpher.config import ConfigError, MorphConfig
from export.build_mar import (
    ExportError,
    archive_max_response_bytes,
    check_sd_folder,
    copy_weights,
    main,
    render_model_config,
)
from tests.conftest import REPO_ROOT


def render(**defaults) -> dict:
    return render_model_config(model_dir="model", lpips_weights="", max_response_bytes=1234,
                               device_type="cpu", workers=1, response_timeout=None, defaults=defaults)


def test_handler_defaults_are_morphconfigs() -> None:
    config = render()
    expected = MorphConfig().to_dict()
    expected.pop("device")
    assert config["handler"]["defaults"] == expected
    assert config["handler"]["max_response_bytes"] == 1234
    assert config["batchSize"] == 1 and config["deviceType"] == "cpu"
    assert config["responseTimeout"] >= 600 and config["startupTimeout"] > 0
    assert render(num_frames=8)["handler"]["defaults"]["num_frames"] == 8
    with pytest.raises(ExportError, match="invalid morph default .*num_frames must be between"):
        render(num_frames=0)


def test_half_precision_on_a_cpu_archive_is_refused_at_export() -> None:
    with pytest.raises(ExportError, match="float16 needs a GPU"):
        render(dtype="float16")
    gpu = render_model_config(model_dir="model", lpips_weights="", max_response_bytes=1, device_type="gpu",
                              workers=1, response_timeout=None, defaults={"dtype": "float16"})
    assert gpu["handler"]["defaults"]["dtype"] == "float16" and gpu["deviceType"] == "gpu"
    plain_gpu = render_model_config(model_dir="model", lpips_weights="", max_response_bytes=1, device_type="gpu",
                                    workers=1, response_timeout=None, defaults={})
    # Unset, each worker picks its device's precision when it loads (devices.default_dtype).
    assert plain_gpu["handler"]["defaults"]["dtype"] == render()["handler"]["defaults"]["dtype"] == "auto"


def test_a_cpu_archive_runs_on_the_cpu_even_where_cuda_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    """TorchServe passes gpu_id only for deviceType gpu: no gpu_id means the CPU, not 'best'."""
    import torch

    from diffmorpher.devices import device_for_worker

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert device_for_worker(None) == torch.device("cpu")
    assert device_for_worker(1) == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="sees no CUDA device"):
        device_for_worker(0)


def test_workers_share_the_hosts_cores_unless_told_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch_threads 0: cores // workers (torch's default, every core per worker, would make N
    workers oversubscribe the host N times); an explicit value or OMP_NUM_THREADS wins."""
    from diffmorpher.devices import worker_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert worker_threads(0, workers=4, cores=16) == 4
    assert worker_threads(0, workers=3, cores=2) == 1
    assert worker_threads(0, workers=1, cores=2) == 2
    assert worker_threads(6, workers=4, cores=16) == 6
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert worker_threads(0, workers=4, cores=16) is None  # torch already follows OMP_NUM_THREADS


def test_max_response_size_is_read_from_config_properties(tmp_path: Path) -> None:
    assert archive_max_response_bytes(REPO_ROOT / "config.properties") == 268435456
    (tmp_path / "c.properties").write_text("# x\nmax_response_size = 999\n")
    assert archive_max_response_bytes(tmp_path / "c.properties") == 999
    assert archive_max_response_bytes(tmp_path / "none.properties") == 256 * 1024 * 1024  # limits'


def test_only_sd_folders_are_accepted(tmp_path: Path, tiny_sd_dir: Path) -> None:
    check_sd_folder(tiny_sd_dir)
    with pytest.raises(ExportError, match="does not exist"):
        check_sd_folder(tmp_path / "nothing")
    (tmp_path / "half" / "unet").mkdir(parents=True)
    with pytest.raises(ExportError, match="missing"):
        check_sd_folder(tmp_path / "half")


def test_legacy_bin_weights_are_left_out(tmp_path: Path, tiny_sd_dir: Path) -> None:
    source = tmp_path / "sd"
    shutil.copytree(tiny_sd_dir, source)
    (source / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"legacy")
    copy_weights(source, tmp_path / "model")
    assert not (tmp_path / "model" / "unet" / "diffusion_pytorch_model.bin").exists()
    assert (tmp_path / "model" / "unet" / "diffusion_pytorch_model.safetensors").exists()


def test_archive_holds_handler_core_weights_and_config(tmp_path: Path, tiny_sd_dir: Path) -> None:
    assert main(["--model", str(tiny_sd_dir), "--export-path", str(tmp_path), "--lpips-weights", "",
                 "--default", "num_frames=6"]) == 0
    with zipfile.ZipFile(tmp_path / "diffmorpher.mar") as archive:
        names = set(archive.namelist())
        config = yaml.safe_load(archive.read("model-config.yaml"))
    assert {"torchserve_handler.py", "handler/morph_request.py", "handler/morph_response.py", "handler/request_stop.py", "morph_protocol/wire.py",
            "morph_protocol/control.py", "diffmorpher/pipeline.py", "model/unet/config.json", "MAR-INF/MANIFEST.json"} <= names
    assert not any(n.startswith(("guard/", "client/", "tests/", "launcher/")) for n in names)  # the worker needs the protocol only
    assert not any("__pycache__" in n for n in names)
    assert config["handler"]["defaults"]["num_frames"] == 6 and config["handler"]["lpips_weights"] == ""


def test_a_models_own_defaults_go_into_its_archive_beneath_the_exports(tmp_path: Path, tiny_sd_dir: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(tiny_sd_dir, model)
    (model / "morph_defaults.json").write_text(json.dumps({"_why": "measured", "attn_lambda": 1.0, "num_frames": 9}))

    def defaults(*args: str) -> dict:
        store = tmp_path / f"store{len(list(tmp_path.iterdir()))}"
        assert main(["--model", str(model), "--export-path", str(store), "--lpips-weights", "", *args]) == 0
        with zipfile.ZipFile(store / "diffmorpher.mar") as archive:
            return yaml.safe_load(archive.read("model-config.yaml"))["handler"]["defaults"]

    assert (defaults()["attn_lambda"], defaults()["num_frames"]) == (1.0, 9)
    assert defaults("--default", "attn_lambda=0.4")["attn_lambda"] == 0.4  # the export's own wins
    (model / "morph_defaults.json").write_text(json.dumps({"attn_lambda": 2.5}))
    assert main(["--model", str(model), "--export-path", str(tmp_path / "bad"), "--lpips-weights", ""]) == 1


def test_the_embedded_model_serves_morphconfigs_defaults() -> None:
    """The sweep on the morph-friendly embedded model chose MorphConfig's own attn_lambda 0.6
    (docs/quality.md, "Which default the numbers support"), so its folder overrides nothing."""
    from export.build_mar import model_defaults

    assert model_defaults(REPO_ROOT / "models" / "tiny-shapes-sd") == {}


# Run in a fresh interpreter: the project's own packages are taken off the path (the editable
# install's finder and the checkout), so only the archive's files can answer the imports.
_ARCHIVE_ONLY_IMPORT = """
import importlib, json, sys
archive, checkout = sys.argv[1], sys.argv[2]
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
sys.path[:] = [archive] + [p for p in sys.path if p not in ("", ".", checkout) and "__editable__" not in p]
handler = importlib.import_module("torchserve_handler")
assert handler.DiffMorpherHandler().initialized is False
project = ("handler", "diffmorpher", "morph_protocol", "guard", "client", "torchserve_handler")
files = {name: getattr(module, "__file__", None) for name, module in sys.modules.items()
         if name.split(".")[0] in project}
print(json.dumps(files))
"""


def test_the_archive_imports_with_only_its_own_files_on_the_path(tmp_path: Path, tiny_sd_dir: Path) -> None:
    """What the worker imports travels in the archive: a clean interpreter with the project's
    packages taken off its path imports the handler from the unpacked archive alone."""
    assert main(["--model", str(tiny_sd_dir), "--export-path", str(tmp_path), "--lpips-weights", "",
                 "--archive-format", "no-archive"]) == 0
    archive = tmp_path / "diffmorpher"
    process = subprocess.run([sys.executable, "-I", "-c", _ARCHIVE_ONLY_IMPORT, str(archive), str(REPO_ROOT)],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    files = json.loads(process.stdout.strip().splitlines()[-1])
    assert {"torchserve_handler", "handler.morph_request", "diffmorpher.pipeline", "morph_protocol.wire"} <= set(files)
    outside = {name: path for name, path in files.items() if path and not Path(path).is_relative_to(archive)}
    assert outside == {}
    assert not any(name.split(".")[0] in ("guard", "client") for name in files)
