"""The bases of the spec's models.

A spec's numbers reach the trainer as JSON, so `SpecModel` takes them strictly: `true` is not 1, `"4"` is not
4, `1` is not `true`, and `.inf`/`.nan` are refused (JSON has no such numbers: they would arrive as null,
silently changing the run). An integer field takes a whole float because YAML 1.2 reads `1e6` as 1000000.0;
it refuses 2.5. The checks run before pydantic's own (`mode="before"`), chosen by each field's annotation,
so the fields stay plain `int`/`float`/`bool` and their JSON Schema, bounds included, is pydantic's.
"""
from __future__ import annotations

import math
import types
from typing import Annotated, Any, Callable, Optional, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError


class Strict(BaseModel):
    """Base of every model: unknown fields are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


def _finite(value: float) -> None:
    if not math.isfinite(value):
        raise PydanticCustomError("finite_number", "must be a finite number")


def strict_int(value: Any) -> Any:
    """An int, or a float with no fractional part (`1e6`); never a bool, a string or a non-finite float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PydanticCustomError("int_type", "must be an integer")
    if isinstance(value, float):
        _finite(value)
        if not value.is_integer():
            raise PydanticCustomError("int_from_float", "must be a whole number")
        return int(value)
    return value


def strict_float(value: Any) -> Any:
    """An int or a finite float; never a bool or a string."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PydanticCustomError("float_type", "must be a number")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        raise PydanticCustomError("finite_number", "must be a finite number") from None
    _finite(number)
    return number


def strict_bool(value: Any) -> Any:
    if not isinstance(value, bool):
        raise PydanticCustomError("bool_type", "must be true or false")
    return value


_SCALAR_CHECKS: dict[Any, Callable[[Any], Any]] = {int: strict_int, float: strict_float, bool: strict_bool}


def _check_for(annotation: Any) -> Optional[Callable[[Any], Any]]:
    """The strict check for a field's annotation: int, float or bool, optional or not, or a tuple of them."""
    if get_origin(annotation) is Annotated:
        return _check_for(get_args(annotation)[0])
    if get_origin(annotation) in (Union, types.UnionType):
        real = [a for a in get_args(annotation) if a is not type(None)]
        return _check_for(real[0]) if len(real) == 1 else None
    if get_origin(annotation) is tuple:
        items = [_check_for(a) for a in get_args(annotation)]
        if items and all(items):
            return lambda v: tuple(check(x) for check, x in zip(items, v)) + tuple(v[len(items):]) \
                if isinstance(v, (list, tuple)) else v
        return None
    try:
        return _SCALAR_CHECKS.get(annotation)
    except TypeError:  # an unhashable annotation
        return None


_CHECKS: dict[type, dict[str, Optional[Callable[[Any], Any]]]] = {}


class SpecModel(Strict):
    """Base of the models a user writes: numbers and booleans are taken strictly (see the module's docstring)."""

    @field_validator("*", mode="before")
    @classmethod
    def _strict_scalars(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None or info.field_name is None:
            return value
        checks = _CHECKS.get(cls)
        if checks is None:
            checks = _CHECKS[cls] = {name: _check_for(field.annotation) for name, field in cls.model_fields.items()}
        check = checks.get(info.field_name)
        return value if check is None else check(value)
