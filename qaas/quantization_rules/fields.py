"""The building blocks of a method's rules: field kinds, the error every rule raises, and `MethodRules`.

A field kind checks one JSON value and returns it normalized (a default for null or absent), or raises
`FieldError` naming the field; it also describes itself as JSON Schema, so that the API's OpenAPI document
is written from the same declaration that decides. JSON types are taken strictly: `true` is not an
integer, `"4"` is not a number, and `"false"` is not a boolean (transformers would read it as truthy).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

#: "absent": the field was not given (as opposed to an explicit null, which also means "the default").
_ABSENT = object()


class FieldError(Exception):
    """One rule broken: which field (a name of quantization_config, dotted below it) and why."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message


class InvalidQuantizationConfig(ValueError):
    """A quantization_config that breaks one or more rules; `errors` lists each, in field order."""

    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__("; ".join(str(e) for e in errors))
        self.errors = errors

    @property
    def field(self) -> str:
        return self.errors[0].field

    @property
    def message(self) -> str:
        return self.errors[0].message


def _nullable(schema: dict[str, Any], nullable: bool) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]} if nullable else schema


@dataclass(frozen=True)
class Kind:
    """A field kind. `default` is what an absent or null value becomes (`required` fields have none)."""

    default: Any = None
    required: bool = False
    description: str = ""
    #: What a missing required field is told.
    missing: str = "field required"

    def check(self, value: Any, name: str) -> Any:
        if value is None:
            if self.required:
                raise FieldError(name, self.missing)
            return self.default
        return self.convert(value, name)

    def convert(self, value: Any, name: str) -> Any:  # pragma: no cover - every kind overrides it
        raise NotImplementedError

    def value_schema(self) -> dict[str, Any]:  # pragma: no cover - every kind overrides it
        raise NotImplementedError

    def schema(self) -> dict[str, Any]:
        s = _nullable(self.value_schema(), not self.required)
        if self.description:
            s = {**s, "description": self.description}
        if self.default is not None:
            s = {**s, "default": self.default}
        return s


@dataclass(frozen=True)
class Boolean(Kind):
    def convert(self, value: Any, name: str) -> bool:
        if not isinstance(value, bool):
            raise FieldError(name, "must be true or false")
        return value

    def value_schema(self) -> dict[str, Any]:
        return {"type": "boolean"}


@dataclass(frozen=True)
class Integer(Kind):
    minimum: int | None = None
    maximum: int | None = None
    #: Values allowed outside [minimum, maximum] (e.g. group_size -1 = one group per row).
    also: tuple[int, ...] = ()
    #: When set, the only values allowed.
    choices: tuple[int, ...] | None = None

    def convert(self, value: Any, name: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise FieldError(name, "must be an integer")
        if self.choices is not None:
            if value not in self.choices:
                raise FieldError(name, f"must be {_one_of(self.choices)}")
            return value
        if value in self.also:
            return value
        low, high = self.minimum, self.maximum
        if (low is not None and value < low) or (high is not None and value > high):
            raise FieldError(name, f"must be {_range(low, high, self.also)}")
        return value

    def value_schema(self) -> dict[str, Any]:
        if self.choices is not None:
            return {"type": "integer", "enum": list(self.choices)}
        s: dict[str, Any] = {"type": "integer"}
        if self.minimum is not None:
            s["minimum"] = self.minimum
        if self.maximum is not None:
            s["maximum"] = self.maximum
        if self.also:
            return {"anyOf": [s, {"type": "integer", "enum": list(self.also)}]}
        return s


@dataclass(frozen=True)
class Number(Kind):
    """A finite JSON number; `exclusive` makes the bounds strict."""

    minimum: float | None = None
    maximum: float | None = None
    exclusive: bool = False

    def convert(self, value: Any, name: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise FieldError(name, "must be a finite number")
        low, high = self.minimum, self.maximum
        if self.exclusive:
            bad = (low is not None and value <= low) or (high is not None and value >= high)
        else:
            bad = (low is not None and value < low) or (high is not None and value > high)
        if bad:
            raise FieldError(name, f"must be {'strictly ' if self.exclusive else ''}{_range(low, high, ())}")
        return float(value)

    def value_schema(self) -> dict[str, Any]:
        s: dict[str, Any] = {"type": "number"}
        lo, hi = ("exclusiveMinimum", "exclusiveMaximum") if self.exclusive else ("minimum", "maximum")
        if self.minimum is not None:
            s[lo] = self.minimum
        if self.maximum is not None:
            s[hi] = self.maximum
        return s


@dataclass(frozen=True)
class Choice(Kind):
    """One of a few strings; `why` explains a refusal (e.g. why only one storage dtype is written)."""

    choices: tuple[str, ...] = ()
    why: str = ""

    def convert(self, value: Any, name: str) -> str:
        if not isinstance(value, str) or value not in self.choices:
            shown = repr(value) if isinstance(value, (str, int, float)) else type(value).__name__
            raise FieldError(name, f"must be {_one_of(self.choices)}, not {shown[:60]}" + (f" ({self.why})" if self.why else ""))
        return value

    def value_schema(self) -> dict[str, Any]:
        return {"type": "string", "enum": list(self.choices)}


@dataclass(frozen=True)
class Text(Kind):
    max_length: int = 200

    def convert(self, value: Any, name: str) -> str:
        if not isinstance(value, str):
            raise FieldError(name, "must be a string")
        if len(value) > self.max_length:
            raise FieldError(name, f"must be at most {self.max_length} characters")
        return value

    def value_schema(self) -> dict[str, Any]:
        return {"type": "string", "maxLength": self.max_length}


@dataclass(frozen=True)
class Names(Kind):
    """A list of non-empty strings (module names); `nested`: a non-empty list of such lists."""

    nested: bool = False
    non_empty: bool = False

    def convert(self, value: Any, name: str) -> list:
        if self.nested:
            what = "a non-empty list of non-empty lists of module names"
            if not isinstance(value, list) or not value:
                raise FieldError(name, f"must be {what}")
            return [self._names(group, f"{name}.{i}", what, True) for i, group in enumerate(value)]
        return self._names(value, name, "a list of module names", self.non_empty)

    @staticmethod
    def _names(value: Any, name: str, what: str, non_empty: bool) -> list[str]:
        if not isinstance(value, list) or (non_empty and not value):
            raise FieldError(name, f"must be {what}")
        for i, n in enumerate(value):
            if not isinstance(n, str) or not n or len(n) > 200:
                raise FieldError(f"{name}.{i}", "must be a module name (1 to 200 characters)")
        return list(value)

    def value_schema(self) -> dict[str, Any]:
        inner = {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 200}}
        if self.nested:
            return {"type": "array", "minItems": 1, "items": {**inner, "minItems": 1}}
        return {**inner, "minItems": 1} if self.non_empty else inner


@dataclass(frozen=True)
class Json(Kind):
    """A value that only a loader reads (accepted so that an existing config is a valid request, and
    without effect on the stored model): any JSON value, or one of `types` ("object", "string", ...)."""

    types: tuple[str, ...] = ()

    _PY = {"object": dict, "array": list, "string": str, "integer": int, "number": (int, float), "boolean": bool}

    def convert(self, value: Any, name: str) -> Any:
        if self.types and not any(self._is(value, t) for t in self.types):
            raise FieldError(name, f"must be {_one_of(self.types, quote=False)}")
        return value

    def _is(self, value: Any, t: str) -> bool:
        if t in ("integer", "number") and isinstance(value, bool):
            return False
        return isinstance(value, self._PY[t])

    def value_schema(self) -> dict[str, Any]:
        if not self.types:
            return {}
        return {"type": list(self.types)} if len(self.types) > 1 else {"type": self.types[0]}

    def schema(self) -> dict[str, Any]:
        return super().schema() if self.types else ({"description": self.description} if self.description else {})


def _one_of(values: tuple, *, quote: bool = True) -> str:
    shown = [repr(v) if quote and isinstance(v, str) else str(v) for v in values]
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " or " + shown[-1]


def _range(low: float | None, high: float | None, also: tuple) -> str:
    if low is not None and high is not None:
        core = f"between {low:g} and {high:g}"
    elif low is not None:
        core = f"at least {low:g}"
    else:
        core = f"at most {high:g}"
    return (f"{_one_of(also)} or " if also else "") + core


#: A rule over several fields: takes the checked values (every field present, defaults filled in) and
#: returns them, adjusted, or raises FieldError naming the field to fix.
Combination = Callable[[dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class MethodRules:
    """Everything a method accepts in quantization_config, declared once.

    `fields` are the ones the method acts on, in the order errors are reported; `loader_fields` are
    accepted and kept but change nothing (what a loader or transformers' own quantizer reads); `aliases`
    map another spelling to its field (the values must agree when both are given); `refused` names fields
    that belong to another method, with the reason; `combine` runs the rules over several fields once
    every field is valid by itself.
    """

    quant_method: str
    title: str
    fields: Mapping[str, Kind]
    loader_fields: Mapping[str, Kind] = field(default_factory=dict)
    aliases: Mapping[str, str] = field(default_factory=dict)
    refused: Mapping[str, str] = field(default_factory=dict)
    combine: Combination | None = None

    def normalize(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The config with every field checked and defaults filled in; InvalidQuantizationConfig otherwise.

        Normalizing a normalized config returns it unchanged."""
        errors: list[FieldError] = []
        given = dict(config)
        for alias, target in self.aliases.items():
            if alias in given:
                value = given.pop(alias)
                if target in given and given[target] is not None and value is not None and given[target] != value:
                    errors.append(FieldError(alias, f"{alias} and {target} disagree"))
                elif given.get(target) is None:
                    given[target] = value
        for key in given:
            if key == "quant_method" or key in self.fields or key in self.loader_fields:
                continue
            why = self.refused.get(key, f"is not a {self.title} option")
            errors.append(FieldError(key, why))
        out: dict[str, Any] = {"quant_method": self.quant_method}
        for name, kind in self.fields.items():
            try:
                out[name] = kind.check(given.get(name), name)
            except FieldError as exc:
                errors.append(exc)
        for name, kind in self.loader_fields.items():
            if given.get(name) is not None:
                try:
                    out[name] = kind.check(given[name], name)
                except FieldError as exc:
                    errors.append(exc)
        if not errors and self.combine is not None:
            try:
                out = self.combine(out)
            except FieldError as exc:
                errors.append(exc)
        if errors:
            raise InvalidQuantizationConfig(errors)
        return out

    def json_schema(self) -> dict[str, Any]:
        """JSON Schema of the accepted configs (the per-field rules; `combine`'s are in the descriptions)."""
        props: dict[str, Any] = {"quant_method": {"type": "string", "const": self.quant_method}}
        for name, kind in {**self.fields, **self.loader_fields}.items():
            props[name] = kind.schema()
        for alias, target in self.aliases.items():
            props[alias] = {**self.fields[target].schema(), "description": f"another spelling of {target}"}
        required = ["quant_method"] + [n for n, k in self.fields.items() if k.required]
        return {"title": self.title, "type": "object", "properties": props, "required": required,
                "additionalProperties": False}


@dataclass(frozen=True)
class ObjectRules:
    """The rules of a plain options object that is not a quantization_config (a fine-tuning job's `lora` and
    `training`): declared fields, refused fields with their reason, a rule over several fields. Errors name
    the field under `prefix` ("lora.r")."""

    title: str
    fields: Mapping[str, Kind]
    refused: Mapping[str, str] = field(default_factory=dict)
    combine: Combination | None = None

    def normalize(self, value: Any, prefix: str) -> dict[str, Any]:
        if value is None:
            value = {}
        if not isinstance(value, Mapping):
            raise InvalidQuantizationConfig([FieldError(prefix, f"must be an object ({self.title})")])
        errors: list[FieldError] = []
        for key in value:
            if key not in self.fields:
                why = self.refused.get(key, f"is not a {self.title} option this service accepts "
                                            f"(accepted: {', '.join(self.fields)})")
                errors.append(FieldError(f"{prefix}.{key}", why))
        out: dict[str, Any] = {}
        for name, kind in self.fields.items():
            try:
                out[name] = kind.check(value.get(name), f"{prefix}.{name}")
            except FieldError as exc:
                errors.append(exc)
        if not errors and self.combine is not None:
            try:
                out = self.combine(out)
            except FieldError as exc:
                errors.append(FieldError(f"{prefix}.{exc.field}", exc.message))
        if errors:
            raise InvalidQuantizationConfig(errors)
        return out

    def json_schema(self) -> dict[str, Any]:
        return {"title": self.title, "type": "object", "additionalProperties": False,
                "properties": {name: kind.schema() for name, kind in self.fields.items()}}
