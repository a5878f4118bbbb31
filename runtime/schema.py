"""Check a manifest dict against the published ``manifest.schema.json`` without the jsonschema package.

The runtime stays lean (numpy, onnx, onnxruntime, tokenizers), so this reads the schema itself and
implements only the keywords the schema file uses. A keyword it does not know is refused, never
skipped, so the schema cannot grow a rule this checker silently ignores; tests/test_manifest.py
checks that it agrees with jsonschema.
"""

from __future__ import annotations

import functools
import json
import re
from typing import Any

from gptedge.runtime.bundle import SCHEMA_PATH
from gptedge.runtime.errors import BundleError

_ANNOTATIONS = {"$schema", "$id", "$defs", "title", "description"}
_CHECKED = {"type", "required", "properties", "additionalProperties", "items", "enum", "const",
            "minimum", "pattern", "$ref"}
_TYPES: dict[str, Any] = {"object": dict, "array": list, "string": str, "boolean": bool,
                          "null": type(None), "integer": int, "number": (int, float)}


@functools.lru_cache(maxsize=1)
def manifest_schema() -> dict[str, Any]:
    """The published schema, parsed once."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def schema_problems(data: Any, schema: dict[str, Any] | None = None) -> list[str]:
    """Every place where ``data`` breaks ``schema`` (default: the manifest schema), as
    ``"path: what"`` strings; empty when it conforms."""
    root = manifest_schema() if schema is None else schema
    problems: list[str] = []
    _check(data, root, root, "manifest", problems)
    return problems


def validate_manifest(data: dict[str, Any], where: str) -> None:
    """Raise :class:`BundleError` naming ``where`` and every schema violation of ``data``."""
    problems = schema_problems(data)
    if problems:
        raise BundleError(f"{where}: the manifest does not match manifest.schema.json ("
                          + "; ".join(problems[:8]) + "); this is a gptedge bug, please report it")


def _check(value: Any, schema: dict[str, Any], root: dict[str, Any], path: str, out: list[str]) -> None:
    unknown = set(schema) - _CHECKED - _ANNOTATIONS
    if unknown:
        raise BundleError(f"{SCHEMA_PATH}: keyword(s) {sorted(unknown)} at {path} are not implemented "
                          "by gptedge.runtime.schema; extend the checker with the schema")
    if "$ref" in schema:
        _check(value, _resolve(schema["$ref"], root), root, path, out)
    if "type" in schema and not _is_type(value, schema["type"]):
        out.append(f"{path}: {type(value).__name__} is not {schema['type']}")
        return
    if "const" in schema and value != schema["const"]:
        out.append(f"{path}: must be {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{path}: {value!r} is not one of {schema['enum']}")
    if "minimum" in schema and _is_type(value, "number") and value < schema["minimum"]:
        out.append(f"{path}: {value!r} is below {schema['minimum']}")
    if "pattern" in schema and isinstance(value, str) and not re.search(schema["pattern"], value):
        out.append(f"{path}: {value!r} does not match {schema['pattern']!r}")
    if isinstance(value, dict):
        _check_object(value, schema, root, path, out)
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            _check(item, schema["items"], root, f"{path}[{i}]", out)


def _check_object(value: dict[str, Any], schema: dict[str, Any], root: dict[str, Any], path: str,
                  out: list[str]) -> None:
    out.extend(f"{path}: missing {key!r}" for key in schema.get("required", ()) if key not in value)
    properties = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for key, item in value.items():
        if key in properties:
            _check(item, properties[key], root, f"{path}.{key}", out)
        elif extra is False:
            out.append(f"{path}: unknown key {key!r}")
        elif isinstance(extra, dict):
            _check(item, extra, root, f"{path}.{key}", out)


def _is_type(value: Any, expected: str | list[str]) -> bool:
    names = [expected] if isinstance(expected, str) else expected
    for name in names:
        if isinstance(value, bool) and name not in ("boolean",):
            continue  # JSON true/false are not numbers, as Python's bool-is-int would have it
        if name == "integer" and isinstance(value, float) and value.is_integer():
            return True
        if isinstance(value, _TYPES[name]):
            return True
    return False


def _resolve(ref: str, root: dict[str, Any]) -> dict[str, Any]:
    if not ref.startswith("#/"):
        raise BundleError(f"{SCHEMA_PATH}: only local $ref ('#/...') is supported, got {ref!r}")
    node: Any = root
    for part in ref[2:].split("/"):
        node = node[part]
    return node
