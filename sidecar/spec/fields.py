"""Typed readers for a spec file's YAML fields, and ``SpecError``.

Each reader checks one value and, when it is wrong, raises ``SpecError`` naming the file,
the field path (``components[1].head``) and the problem, so the loader reads as a list of
what each field must be.
"""

from __future__ import annotations

import difflib
import math
import re
from pathlib import Path

import yaml

NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


class SpecError(ValueError):
    """A spec that cannot be used; ``file``, ``field`` and ``problem`` say where and why."""

    def __init__(self, file: str | Path, field: str, problem: str):
        self.file = str(file)
        self.field = field
        self.problem = problem
        super().__init__(format_spec_error(self.file, field, problem))


def format_spec_error(file: str, field: str, problem: str) -> str:
    """``file: field: problem``, the form compilers use, so editors and CI can point at it."""
    return f"{file}: {field}: {problem}" if field else f"{file}: {problem}"


def describe(value: object) -> str:
    """A value as an error message shows it: its YAML-level type and its text."""
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"


def child(parent: str, key: str) -> str:
    return f"{parent}.{key}" if parent else key


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, which plain YAML loaders silently overwrite."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


class FieldReader:
    """Reads the fields of one spec file; every error names ``file``."""

    def __init__(self, file: Path):
        self.file = file

    def error(self, field: str, problem: str) -> SpecError:
        return SpecError(self.file, field, problem)

    def parse(self, raw: bytes) -> object:
        """The YAML document in ``raw`` (safe loading: plain data only, no Python objects)."""
        try:
            return yaml.load(raw, Loader=_UniqueKeyLoader)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(e, "problem", None) or str(e)
            raise self.error("", f"YAML syntax error{where}: {problem}") from None

    def mapping(self, field: str, value: object, required: tuple, optional: tuple = ()) -> dict:
        """``value`` as a dict with every required key and no key outside required + optional."""
        if not isinstance(value, dict):
            raise self.error(field or "top level", f"expected a mapping, got {describe(value)}")
        allowed = required + optional
        for key in value:
            if key not in allowed:
                close = difflib.get_close_matches(str(key), allowed, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise self.error(
                    child(field, str(key)), f"unknown key ({hint}allowed: {', '.join(allowed)})"
                )
        for key in required:
            if key not in value:
                raise self.error(child(field, key), "missing required key")
        return value

    def items(self, field: str, value: object) -> list:
        """A non-empty list."""
        if not isinstance(value, list):
            raise self.error(field, f"expected a list, got {describe(value)}")
        if not value:
            raise self.error(field, "empty: a spec needs at least one entry")
        return value

    def string(self, field: str, value: object) -> str:
        if not isinstance(value, str) or not value:
            raise self.error(field, f"expected a non-empty string, got {describe(value)}")
        return value

    def name(self, field: str, value: object) -> str:
        """A name that is safe as a Prometheus label value and a Python identifier."""
        text = self.string(field, value)
        if not NAME_RE.match(text):
            raise self.error(field, f"bad name {text!r}: use [a-z][a-z0-9_]*")
        return text

    def number(self, field: str, value: object) -> float:
        """A finite int or float; YAML text that only looks like a number is refused."""
        if isinstance(value, str):
            hint = " (YAML 1.1 reads 1e-3 as text: write 1.0e-3)" if _is_float(value) else ""
            raise self.error(field, f"expected a number, got string {value!r}{hint}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(field, f"expected a number, got {describe(value)}")
        if not math.isfinite(value):
            raise self.error(field, f"{value} is not a finite number")
        return float(value)

    def index(self, field: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.error(field, f"expected an index >= 0, got {describe(value)}")
        return value

    def unique(self, field: str, names: list[str]) -> None:
        """Refuse the second use of a name in the list at ``field``."""
        for i, text in enumerate(names):
            if text in names[:i]:
                first = names.index(text)
                raise self.error(f"{field}[{i}].name", f"duplicate name {text!r} (see [{first}])")


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
