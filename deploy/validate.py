"""Validate every manifest in deploy/ offline, against the real schemas, before `kubectl apply`.

    python -m deploy.validate            # exit 1 and one line per invalid manifest

No cluster is needed. Core kinds (Deployment, Service, ConfigMap, HPA, ...) are checked with
kubernetes-validate's strict schemas for Kubernetes KUBERNETES_VERSION, in which no object
accepts a field it does not define. An InferenceService or a ServingRuntime is checked against
the openAPIV3Schema of KServe's own published CRD (vendored in deploy/schemas/, with its release
and commit), closed the same way: the API server prunes unknown fields of a custom resource
silently, and `kubectl apply --validate=strict` refuses them, which is what this mirrors. Its
metadata is checked as the Kubernetes ObjectMeta it is.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import kubernetes_validate
import yaml
from referencing import Registry, Resource

KUBERNETES_VERSION = "1.31"
DEPLOY_DIR = Path(__file__).resolve().parent
SCHEMA_DIR = DEPLOY_DIR / "schemas"
KSERVE_SCHEMA = SCHEMA_DIR / "kserve-inferenceservice-v1beta1.schema.yaml"
KSERVE_API_VERSION = "serving.kserve.io/v1beta1"
# KServe kinds -> (apiVersion, the vendored schema of that version's CRD)
KSERVE_KINDS: dict[str, tuple[str, Path]] = {
    "InferenceService": (KSERVE_API_VERSION, KSERVE_SCHEMA),
    "ServingRuntime": ("serving.kserve.io/v1alpha1", SCHEMA_DIR / "kserve-servingruntime-v1alpha1.schema.yaml"),
}
# YAML files in deploy/ that are not Kubernetes objects: kustomize's own file, Helm values.
NOT_OBJECTS = frozenset({"kustomization.yaml", "values.yaml"})
OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


class ManifestError(ValueError):
    """A manifest that is not valid, with where and why."""


@dataclass(frozen=True)
class Manifest:
    path: Path
    index: int  # position of the document in its file
    doc: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.doc.get("kind", ""))

    @property
    def name(self) -> str:
        return str(self.doc.get("metadata", {}).get("name", ""))

    def __str__(self) -> str:
        try:
            where = self.path.relative_to(DEPLOY_DIR.parent)
        except ValueError:
            where = self.path
        return f"{where}#{self.index} {self.kind}/{self.name}"


def manifest_files(root: Path = DEPLOY_DIR) -> list[Path]:
    """Every YAML file under `root` that holds Kubernetes objects."""
    return sorted(
        path for path in root.rglob("*.yaml")
        if path.name not in NOT_OBJECTS and SCHEMA_DIR not in path.parents
    )


def load_manifests(paths: list[Path]) -> list[Manifest]:
    manifests = []
    for path in paths:
        for index, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is None:
                continue
            manifest = Manifest(path, index, doc)
            if not isinstance(doc, dict) or not doc.get("apiVersion") or not doc.get("kind"):
                raise ManifestError(f"{manifest}: not a Kubernetes object (no apiVersion/kind)")
            if not manifest.name:
                raise ManifestError(f"{manifest}: metadata.name is missing")
            manifests.append(manifest)
    return manifests


def _where(error: jsonschema.ValidationError) -> str:
    return ".".join(str(part) for part in error.absolute_path) or "(top level)"


def validate(manifest: Manifest, version: str = KUBERNETES_VERSION) -> None:
    """Raises ManifestError naming the field when `manifest` does not match its schema."""
    if manifest.kind in KSERVE_KINDS:
        validate_kserve_resource(manifest, version)
        return
    try:
        kubernetes_validate.validate(manifest.doc, version, strict=True)
    except kubernetes_validate.ValidationError as error:
        raise ManifestError(f"{manifest}: {_where(error)}: {error.message}") from error
    except kubernetes_validate.SchemaNotFoundError as error:
        raise ManifestError(f"{manifest}: {error.message}") from error


# ---------------------------------------------------------------------------- KServe resources
def read_vendored_schema(path: Path = KSERVE_SCHEMA) -> dict[str, Any]:
    """The vendored schema: JSON after a header of `#` comment lines."""
    lines = path.read_text().splitlines(keepends=True)
    return json.loads("".join(line for line in lines if not line.startswith("#")))


def schema_source(path: Path = KSERVE_SCHEMA) -> str:
    """The `source:` line of the vendored schema's header (release and commit)."""
    for line in path.read_text().splitlines():
        if line.startswith("# source:"):
            return line.removeprefix("# source:").strip()
        if not line.startswith("#"):
            break
    raise ManifestError(f"{path} has no '# source:' header line")


def closed(schema: Any) -> Any:
    """`schema` with every object that lists its properties closed to others
    (additionalProperties: false), except where the CRD keeps unknown fields on purpose
    (x-kubernetes-preserve-unknown-fields) or types its extra keys (additionalProperties)."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    result = {}
    for key, value in schema.items():
        if key == "properties":  # a map of field name -> schema, not a schema itself
            result[key] = {name: closed(sub) for name, sub in value.items()}
        else:
            result[key] = closed(value)
    if ("properties" in schema and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")):
        result["additionalProperties"] = False
    return result


@lru_cache(maxsize=len(KSERVE_KINDS))
def _kserve_validator(kind: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(closed(read_vendored_schema(KSERVE_KINDS[kind][1])))


@lru_cache(maxsize=4)
def _object_meta_validator(version: str) -> jsonschema.Draft202012Validator:
    folder = f"v{version}.0-local-strict"
    text = (resources.files("kubernetes_validate") / "kubernetes-json-schema" / folder
            / "_definitions.json").read_text()
    definitions = json.loads(text)
    registry = Resource.from_contents(definitions) @ Registry()
    return jsonschema.Draft202012Validator(
        {"$ref": f"{definitions['$id']}#/$defs/{OBJECT_META}"}, registry=registry,
    )


def validate_kserve_resource(manifest: Manifest, version: str = KUBERNETES_VERSION) -> None:
    """An InferenceService or ServingRuntime against its vendored CRD schema, its metadata as
    Kubernetes ObjectMeta."""
    doc = manifest.doc
    api_version = KSERVE_KINDS[manifest.kind][0]
    if doc.get("apiVersion") != api_version:
        raise ManifestError(f"{manifest}: apiVersion must be {api_version}, got {doc.get('apiVersion')!r}")
    error = jsonschema.exceptions.best_match(_kserve_validator(manifest.kind).iter_errors(doc))
    if error is not None:
        raise ManifestError(f"{manifest}: {_where(error)}: {error.message}")
    meta_error = jsonschema.exceptions.best_match(
        _object_meta_validator(version).iter_errors(doc.get("metadata", {}))
    )
    if meta_error is not None:
        where = ".".join(["metadata", *(str(part) for part in meta_error.absolute_path)])
        raise ManifestError(f"{manifest}: {where}: {meta_error.message}")


# ---------------------------------------------------------------------------- command line
def errors(manifests: list[Manifest], version: str = KUBERNETES_VERSION) -> Iterator[str]:
    for manifest in manifests:
        try:
            validate(manifest, version)
        except ManifestError as error:
            yield str(error)


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m deploy.validate", description=__doc__.split("\n")[0]).parse_args(argv)
    manifests = load_manifests(manifest_files())
    found = list(errors(manifests))
    for line in found:
        print(line, file=sys.stderr)
    print(f"{len(manifests) - len(found)}/{len(manifests)} manifests valid "
          f"(Kubernetes {KUBERNETES_VERSION} strict; KServe {schema_source()})")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
