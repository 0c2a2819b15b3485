"""What the Kubernetes API server checks of a CRD schema, in a few lines, for tests.

`structural_problems(schema)`: why a CRD's openAPIV3Schema would be rejected as non-structural.
`validate(value, schema)`: the errors the API server would report for an object (types, enums,
ranges, patterns, required fields), plus the fields it would silently prune as unknown.
"""
from __future__ import annotations

import re
from typing import Any

FORBIDDEN = ("$ref", "title", "const", "prefixItems", "anyOf", "oneOf", "allOf", "not", "$defs", "definitions", "uniqueItems")
EXTENSIONS = ("x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string", "x-kubernetes-embedded-resource")


def structural_problems(schema: dict, path: str = "", root: bool = True) -> list[str]:
    problems = []
    where = path or "<root>"
    for key in FORBIDDEN:
        if key in schema:
            problems.append(f"{where}: {key} is not allowed")
    if "type" not in schema and not any(schema.get(ext) for ext in EXTENSIONS[:2]):
        problems.append(f"{where}: no type")
    if "properties" in schema and "additionalProperties" in schema:
        problems.append(f"{where}: properties and additionalProperties together")
    for key in ("exclusiveMinimum", "exclusiveMaximum"):
        if key in schema and not isinstance(schema[key], bool):
            problems.append(f"{where}: {key} must be a boolean in OpenAPI v3.0")
    if schema.get("nullable") and "default" in schema and schema["default"] is None:
        problems.append(f"{where}: default null")
    for name, sub in schema.get("properties", {}).items():
        if root and name == "metadata" and set(sub) - {"type", "properties", "description"}:
            problems.append("metadata: only name/generateName may be constrained")
        problems += structural_problems(sub, f"{path}.{name}".lstrip("."), root=False)
    if isinstance(schema.get("additionalProperties"), dict):
        problems += structural_problems(schema["additionalProperties"], f"{path}.*", root=False)
    if isinstance(schema.get("items"), dict):
        problems += structural_problems(schema["items"], f"{path}[]", root=False)
    elif "items" in schema:
        problems.append(f"{where}: items must be one schema")
    return problems


def validate(value: Any, schema: dict, path: str = "") -> list[str]:
    where = path or "<root>"
    if value is None:
        return [] if schema.get("nullable") else [f"{where}: null is not allowed"]
    if schema.get("x-kubernetes-int-or-string"):
        ok = isinstance(value, (int, str)) and not isinstance(value, bool)
        return [] if ok else [f"{where}: must be an integer or a string"]
    kind = schema.get("type")
    errors: list[str] = []
    if kind is None:
        return errors  # x-kubernetes-preserve-unknown-fields: anything
    if not _has_type(value, kind):
        return [f"{where}: must be {kind}, not {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if kind in ("integer", "number"):
        errors += _range(value, schema, where)
    if kind == "string":
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
        if len(value) > schema.get("maxLength", len(value)) or len(value) < schema.get("minLength", 0):
            errors.append(f"{where}: length {len(value)} out of range")
    if kind == "array":
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", len(value)):
            errors.append(f"{where}: {len(value)} items out of range")
        for i, item in enumerate(value):
            errors += validate(item, schema.get("items", {}), f"{path}[{i}]")
    if kind == "object":
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for name in schema.get("required", []):
            if name not in value:
                errors.append(f"{where}: {name} is required")
        for name, item in value.items():
            sub = f"{path}.{name}".lstrip(".")
            if path == "" and name == "metadata":
                continue  # ObjectMeta is validated by the API server itself, not by the CRD schema
            if name in props:
                errors += validate(item, props[name], sub)
            elif isinstance(extra, dict):
                errors += validate(item, extra, sub)
            elif not schema.get("x-kubernetes-preserve-unknown-fields"):
                errors.append(f"{sub}: unknown field (would be pruned)")
    return errors


def _has_type(value: Any, kind: str) -> bool:
    return {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "boolean": lambda v: isinstance(v, bool),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    }[kind](value)


def _range(value: float, schema: dict, where: str) -> list[str]:
    errors = []
    if "minimum" in schema:
        low, strict = schema["minimum"], schema.get("exclusiveMinimum", False)
        if value < low or (strict and value == low):
            errors.append(f"{where}: must be {'>' if strict else '>='} {low}")
    if "maximum" in schema:
        high, strict = schema["maximum"], schema.get("exclusiveMaximum", False)
        if value > high or (strict and value == high):
            errors.append(f"{where}: must be {'<' if strict else '<='} {high}")
    return errors
