"""Vendor the InferenceService schema from KServe's published CRD, for offline validation.

The `kserve` SDK cannot be installed beside our pins (kserve 0.21.0 needs protobuf < 7,
grpcio-tools 1.85.1 needs protobuf >= 7.35.1), so deploy/validate.py checks InferenceService
manifests against the CRD's own openAPIV3Schema instead. This script copies that schema out of
the CRD YAML verbatim (no field added, dropped or changed) and records where it came from:

    python deploy/schemas/vendor_kserve_schema.py \
        --crd <kserve checkout>/config/crd/full/serving.kserve.io_inferenceservices.yaml \
        --repository kserve/kserve --ref v0.20.0 --commit <40 hex digits> \
        --path config/crd/full/serving.kserve.io_inferenceservices.yaml

The output is JSON (which YAML also reads) after a header of `#` comments.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import yaml

OUTPUT = Path(__file__).with_name("kserve-inferenceservice-v1beta1.schema.yaml")
VERSION = "v1beta1"


def crd_schema(crd_text: str, version: str = VERSION) -> dict[str, Any]:
    """The openAPIV3Schema of `version` in an InferenceService CRD."""
    documents = [doc for doc in yaml.load_all(crd_text, Loader=yaml.CSafeLoader) if doc]
    crds = [doc for doc in documents if doc.get("kind") == "CustomResourceDefinition"
            and doc.get("spec", {}).get("names", {}).get("kind") == "InferenceService"]
    if len(crds) != 1:
        raise ValueError(f"expected one InferenceService CRD, found {len(crds)}")
    for entry in crds[0]["spec"]["versions"]:
        if entry["name"] == version:
            return entry["schema"]["openAPIV3Schema"]
    raise ValueError(f"the CRD has no version {version!r}")


def render(schema: dict[str, Any], repository: str, ref: str, commit: str, path: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{40}", commit):
        raise ValueError(f"commit must be 40 hex digits, got {commit!r}")
    header = [
        f"# InferenceService {VERSION} openAPIV3Schema, verbatim from KServe's published CRD.",
        f"# source: https://github.com/{repository} {ref} (commit {commit})",
        f"# path:   {path}",
        "# written by deploy/schemas/vendor_kserve_schema.py; read by deploy/validate.py.",
        "# JSON below the comments (YAML reads it too).",
    ]
    return "\n".join(header) + "\n" + json.dumps(schema, indent=0, sort_keys=True) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crd", required=True, type=Path, help="serving.kserve.io_inferenceservices.yaml")
    parser.add_argument("--repository", default="kserve/kserve")
    parser.add_argument("--ref", required=True, help="the release tag, e.g. v0.20.0")
    parser.add_argument("--commit", required=True, help="the tag's commit (40 hex digits)")
    parser.add_argument("--path", default="config/crd/full/serving.kserve.io_inferenceservices.yaml")
    parser.add_argument("--out", type=Path, default=OUTPUT)
    args = parser.parse_args()
    schema = crd_schema(args.crd.read_text())
    args.out.write_text(render(schema, args.repository, args.ref, args.commit, args.path))
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
