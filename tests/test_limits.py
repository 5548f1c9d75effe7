"""The config files the service ships agree with morph_protocol.limits, checked in one place.

TorchServe reads its limits from config.properties (and the ConfigMap / KServe copies of it), the
worker from the archive's model-config.yaml; neither can import Python, so they hold the numbers
themselves. These tests fail when one of them disagrees with the limit's one definition, and
`test_a_disagreeing_copy_is_caught` shows that the checks would notice.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from morph_protocol import limits
from morph_protocol.properties import (
    max_request_bytes,
    max_response_bytes,
    parse_properties,
    read_properties,
    replace_properties,
)
from tests.conftest import REPO_ROOT

# TorchServe's config.properties keys and the limits they must equal.
PROPERTIES_LIMITS = {
    "max_request_size": limits.MAX_REQUEST_BYTES,
    "max_response_size": limits.MAX_RESPONSE_BYTES,
}
# The worker's settings (model-config.yaml `handler:`) and the limits they must equal.
HANDLER_LIMITS = {
    "max_response_bytes": limits.MAX_RESPONSE_BYTES,
    "progress_interval_s": limits.PROGRESS_INTERVAL_S,
    "cache_max_bytes": limits.CACHE_MAX_BYTES,
    "cache_redis_max_entry_bytes": limits.CACHE_REDIS_MAX_ENTRY_BYTES,
}


def properties_disagreements(text: str) -> list[str]:
    """What a config.properties text sets differently from the limits (a missing key counts:
    TorchServe's own default is not ours)."""
    props = parse_properties(text)
    return [f"{key}={props.get(key)!r}, limits say {value}"
            for key, value in PROPERTIES_LIMITS.items() if props.get(key) != str(value)]


def model_config_disagreements(text: str) -> list[str]:
    """What a model-config.yaml text's `handler:` section sets differently from the limits."""
    handler = (yaml.safe_load(text) or {}).get("handler") or {}
    return [f"handler.{key}={handler.get(key)!r}, limits say {value}"
            for key, value in HANDLER_LIMITS.items() if handler.get(key) != value]


def configmap_properties(path: Path) -> str:
    """The config.properties text embedded in the Kubernetes ConfigMap."""
    (configmap,) = [doc for doc in yaml.safe_load_all(path.read_text()) if doc and doc.get("kind") == "ConfigMap"]
    return configmap["data"]["config.properties"]


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("config.properties", (REPO_ROOT / "config.properties").read_text()),
        ("deploy/kserve/config.properties", (REPO_ROOT / "deploy" / "kserve" / "config.properties").read_text()),
        ("deploy/base/configmap.yaml", configmap_properties(REPO_ROOT / "deploy" / "base" / "configmap.yaml")),
    ],
)
def test_every_config_properties_sets_the_size_limits(name: str, text: str) -> None:
    assert properties_disagreements(text) == [], name


def test_the_archive_template_sets_the_worker_limits() -> None:
    assert model_config_disagreements((REPO_ROOT / "export" / "model-config.yaml").read_text()) == []


def test_a_disagreeing_copy_is_caught() -> None:
    """The checks above can fail: a changed, a missing and a wrongly typed value are reported."""
    good = (REPO_ROOT / "config.properties").read_text()
    wrong, missing = replace_properties(good, {"max_response_size": "268435457"})
    assert missing == {}
    assert properties_disagreements(wrong) == ["max_response_size='268435457', limits say 268435456"]
    without = "\n".join(line for line in good.splitlines() if not line.startswith("max_request_size"))
    assert properties_disagreements(without) == ["max_request_size=None, limits say 104857600"]
    template = (REPO_ROOT / "export" / "model-config.yaml").read_text()
    changed = template.replace("progress_interval_s: 0.5", "progress_interval_s: 2")
    assert changed != template
    assert model_config_disagreements(changed) == ["handler.progress_interval_s=2, limits say 0.5"]


def test_the_limits_have_the_values_the_service_documents() -> None:
    """Real numbers, as README/SECURITY.md state them: a change here is a change of the service."""
    assert (limits.MIN_IMAGES, limits.MAX_IMAGES) == (2, 8)
    assert limits.MAX_REQUEST_BYTES == 104857600 and limits.MAX_RESPONSE_BYTES == 268435456
    assert limits.MAX_IMAGE_PIXELS == 4096 * 4096 and limits.MAX_PROMPT_CHARS == 2000
    assert limits.MAX_PROMPT_BYTES == 8000 and limits.MAX_OPTIONS_BYTES == 65536
    assert limits.CACHE_MAX_BYTES == 10 * 2**30 and limits.CACHE_REDIS_MAX_ENTRY_BYTES == 512 * 2**20


def test_sizes_are_read_from_config_properties_with_the_limits_as_defaults(tmp_path: Path) -> None:
    repo = read_properties(REPO_ROOT / "config.properties")
    assert (max_request_bytes(repo), max_response_bytes(repo)) == (104857600, 268435456)
    (tmp_path / "c.properties").write_text("# max_request_size=1\nmax_request_size = 12345\n")
    props = read_properties(tmp_path / "c.properties")
    assert (max_request_bytes(props), max_response_bytes(props)) == (12345, limits.MAX_RESPONSE_BYTES)
    with pytest.raises(ValueError, match="max_response_size='lots'"):
        max_response_bytes({"max_response_size": "lots"})
    with pytest.raises(FileNotFoundError):
        read_properties(tmp_path / "missing.properties")


def test_replace_properties_keeps_comments_and_reports_keys_it_has_no_line_for() -> None:
    text, missing = replace_properties("# max_request_size=1\nmax_request_size=2\n", {"max_request_size": "3", "x": "4"})
    assert text == "# max_request_size=1\nmax_request_size=3\n" and missing == {"x": "4"}


def test_the_protocol_imports_only_the_standard_library() -> None:
    """morph_protocol travels in the archive and into every process: nothing of the project or
    of third parties."""
    import subprocess
    import sys

    code = (
        "import sys; before = set(sys.modules); "
        "import morph_protocol.limits, morph_protocol.properties, morph_protocol.errors, "
        "morph_protocol.torchserve, morph_protocol.wire, morph_protocol.oip, morph_protocol.control, "
        "morph_protocol.keyfile; "
        "bad = sorted(m for m in set(sys.modules) - before if m.split('.')[0] not in sys.stdlib_module_names "
        "and m.split('.')[0] != 'morph_protocol'); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)
