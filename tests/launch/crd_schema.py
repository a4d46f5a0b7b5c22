"""Offline, strict validation of KubeRay manifests against the CRDs' OpenAPI v3 schemas.

No API server runs here, so a manifest is checked the way the server would check its
structure: against ``spec.versions[<version>].schema.openAPIV3Schema`` of the CRD (files in
``crds/``: KubeRay's, see their headers), after the schema's defaults are applied (as the
server does first), with unknown fields rejected (the server prunes or, with strict field
validation, rejects them): every object that lists ``properties`` and does not carry
``x-kubernetes-preserve-unknown-fields`` gets ``additionalProperties: false``. CEL rules
(``x-kubernetes-validations``) are not evaluated.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import jsonschema
import yaml

CRDS = Path(__file__).parent / "crds"


@functools.lru_cache(maxsize=None)
def crd_schema(kind: str, version: str = "v1") -> dict:
    """The OpenAPI v3 schema of ``kind`` (RayJob, RayCluster) at ``version``."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((CRDS / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=loader)
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return strict(entry["schema"]["openAPIV3Schema"])


def strict(schema: dict) -> dict:
    """A copy of ``schema`` in which listed properties are the only ones allowed."""
    schema = copy.deepcopy(schema)

    def visit(node: object) -> None:
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema)
    return schema


def with_defaults(schema: dict, value: object) -> object:
    """A copy of ``value`` with the schema's defaults filled in where fields are absent."""
    if isinstance(value, dict) and "properties" in schema:
        out = dict(value)
        for name, sub in schema["properties"].items():
            if name in out:
                out[name] = with_defaults(sub, out[name])
            elif "default" in sub:
                out[name] = copy.deepcopy(sub["default"])
        return out
    if isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        return {k: with_defaults(schema["additionalProperties"], v) for k, v in value.items()}
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [with_defaults(schema["items"], v) for v in value]
    return value


def errors(manifest: dict) -> list[str]:
    """Every schema violation of ``manifest`` (its kind's CRD at its apiVersion), as text."""
    schema = crd_schema(manifest["kind"], manifest["apiVersion"].split("/")[-1])
    validator = jsonschema.Draft7Validator(schema)
    found = validator.iter_errors(with_defaults(schema, manifest))
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in found)
