"""Vendor a KServe resource's schema from KServe's published CRD, for offline validation.

The `kserve` SDK cannot be installed beside our pins (kserve 0.21.0 needs protobuf < 7,
grpcio-tools 1.85.1 needs protobuf >= 7.35.1), so deploy/validate.py checks InferenceService and
ServingRuntime manifests against the CRDs' own openAPIV3Schema instead. This script copies that
schema out of the CRD YAML verbatim (no field added, dropped or changed) and records where it
came from:

    python deploy/schemas/vendor_kserve_schema.py --kind InferenceService \
        --crd <kserve checkout>/config/crd/full/serving.kserve.io_inferenceservices.yaml \
        --repository kserve/kserve --ref v0.20.0 --commit <40 hex digits>
    python deploy/schemas/vendor_kserve_schema.py --kind ServingRuntime \
        --crd <kserve checkout>/config/crd/full/serving.kserve.io_servingruntimes.yaml \
        --repository kserve/kserve --ref v0.20.0 --commit <40 hex digits>

(`git show v0.20.0:config/crd/full/...` in a clone gives the file of a release.) The output,
deploy/schemas/kserve-<kind>-<version>.schema.yaml, is JSON (which YAML also reads) after a
header of `#` comments.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import yaml

SCHEMA_DIR = Path(__file__).parent
# kind -> (the CRD version we vendor, the CRD's path in the kserve repository)
KINDS: dict[str, tuple[str, str]] = {
    "InferenceService": ("v1beta1", "config/crd/full/serving.kserve.io_inferenceservices.yaml"),
    "ServingRuntime": ("v1alpha1", "config/crd/full/serving.kserve.io_servingruntimes.yaml"),
}


def output_path(kind: str) -> Path:
    """Where the schema of `kind` is vendored (read by deploy/validate.py)."""
    version, _ = KINDS[kind]
    return SCHEMA_DIR / f"kserve-{kind.lower()}-{version}.schema.yaml"


def crd_schema(crd_text: str, kind: str = "InferenceService", version: str | None = None) -> dict[str, Any]:
    """The openAPIV3Schema of `version` (default: the one we vendor) in the CRD of `kind`."""
    version = version or KINDS[kind][0]
    documents = [doc for doc in yaml.load_all(crd_text, Loader=yaml.CSafeLoader) if doc]
    crds = [doc for doc in documents if doc.get("kind") == "CustomResourceDefinition"
            and doc.get("spec", {}).get("names", {}).get("kind") == kind]
    if len(crds) != 1:
        raise ValueError(f"expected one {kind} CRD, found {len(crds)}")
    for entry in crds[0]["spec"]["versions"]:
        if entry["name"] == version:
            return entry["schema"]["openAPIV3Schema"]
    raise ValueError(f"the CRD has no version {version!r}")


def render(schema: dict[str, Any], repository: str, ref: str, commit: str, path: str,
           kind: str = "InferenceService") -> str:
    if not re.fullmatch(r"[0-9a-f]{40}", commit):
        raise ValueError(f"commit must be 40 hex digits, got {commit!r}")
    header = [
        f"# {kind} {KINDS[kind][0]} openAPIV3Schema, verbatim from KServe's published CRD.",
        f"# source: https://github.com/{repository} {ref} (commit {commit})",
        f"# path:   {path}",
        "# written by deploy/schemas/vendor_kserve_schema.py; read by deploy/validate.py.",
        "# JSON below the comments (YAML reads it too).",
    ]
    return "\n".join(header) + "\n" + json.dumps(schema, indent=0, sort_keys=True) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=sorted(KINDS), default="InferenceService")
    parser.add_argument("--crd", required=True, type=Path, help="the CRD's YAML file")
    parser.add_argument("--repository", default="kserve/kserve")
    parser.add_argument("--ref", required=True, help="the release tag, e.g. v0.20.0")
    parser.add_argument("--commit", required=True, help="the tag's commit (40 hex digits)")
    parser.add_argument("--path", help="the CRD's path in the repository (default: the kind's)")
    parser.add_argument("--out", type=Path, help="default: deploy/schemas/kserve-<kind>-<version>.schema.yaml")
    args = parser.parse_args()
    schema = crd_schema(args.crd.read_text(), args.kind)
    out = args.out or output_path(args.kind)
    out.write_text(render(schema, args.repository, args.ref, args.commit, args.path or KINDS[args.kind][1], args.kind))
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
