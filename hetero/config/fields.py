"""Typed reading of one YAML mapping, with errors that name file, field path and line.

Each config section reads its fields through a `Section`: it checks types and
ranges, remembers which keys it used, and at the end refuses unknown keys with a
did-you-mean. YAML booleans and floats are never accepted where an integer
belongs (YAML turns `yes` into True, and Python would treat True as 1).
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from typing import Any, Callable, NoReturn, overload

from hetero.config.yaml_io import YamlDocument
from hetero.errors import ConfigError

_MISSING = object()
REQUIRED = _MISSING  # pass as `default` to make a field required conditionally
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")


def describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, (int, float)):
        return f"{value!r} (a {'float' if isinstance(value, float) else 'integer'})"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"{shown!r} (a string)"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


class Section:
    """One mapping in one file, read field by field."""

    def __init__(self, doc: YamlDocument, path: str, data: Any):
        self.doc = doc
        self.path = path
        if not isinstance(data, dict):
            self.fail("", f"expected a mapping of fields, got {describe(data)}")
        self.data = data
        self.used: set = set()

    # -- errors ---------------------------------------------------------------
    def field_path(self, name: str) -> str:
        if not name:
            return self.path
        return f"{self.path}.{name}" if self.path else name

    def fail(self, name: str, message: str) -> NoReturn:
        path = self.field_path(name)
        line = self.doc.lines.get(path)
        where = f"{path} (line {line})" if path and line else path or (f"line {line}" if line else "")
        raise ConfigError(self.doc.source, where, message)

    # -- access ---------------------------------------------------------------
    def get(self, name: str, check: Callable[[Any], Any], default: Any = _MISSING) -> Any:
        self.used.add(name)
        if name not in self.data:
            if default is _MISSING:
                self.fail("", f"missing required field '{name}'")
            return default
        try:
            return check(self.data[name])
        except Invalid as exc:
            self.fail(name, str(exc))

    @overload
    def section(self, name: str) -> "Section": ...

    @overload
    def section(self, name: str, default: None) -> "Section | None": ...

    def section(self, name: str, default: Any = _MISSING) -> "Section | None":
        """The mapping `name`, read as its own Section; without a default it is required
        (so callers that pass none get a Section, never None)."""
        self.used.add(name)
        if name not in self.data:
            if default is _MISSING:
                self.fail("", f"missing required section '{name}'")
            return default
        return Section(self.doc, self.field_path(name), self.data[name])

    def items(self, name: str, min_items: int = 1, max_items: int = 100_000) -> list["Section"]:
        """A list of mappings, each read as its own Section (`name[i]`)."""
        self.used.add(name)
        if name not in self.data:
            self.fail("", f"missing required list '{name}'")
        value = self.data[name]
        if not isinstance(value, list):
            self.fail(name, f"expected a list, got {describe(value)}")
        if len(value) < min_items:
            self.fail(name, f"expected at least {min_items} entr{'y' if min_items == 1 else 'ies'}, got none"
                      if not value else f"expected at least {min_items} entries, got {len(value)}")
        if len(value) > max_items:
            self.fail(name, f"expected at most {max_items} entries, got {len(value)}")
        return [Section(self.doc, f"{self.field_path(name)}[{i}]", item) for i, item in enumerate(value)]

    def finish(self) -> None:
        """Refuse keys nobody asked for; suggest the closest known one."""
        for key in self.data:
            if key in self.used:
                continue
            if not isinstance(key, str):
                self.fail("", f"field names must be strings, got {describe(key)}")
            close = difflib.get_close_matches(key, sorted(self.used), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known fields: {', '.join(sorted(self.used))}"
            self.fail(key, f"unknown field '{key}'{hint}")


class Invalid(ValueError):
    """A value of the wrong type or range; Section turns it into a ConfigError."""


# -- value checks (each returns the value, converted, or raises Invalid) -----

def integer(low: int = 1, high: int = 1 << 31) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(f"expected an integer from {low} to {high}, got {describe(value)}")
        if not low <= value <= high:
            raise Invalid(f"expected an integer from {low} to {high}, got {value}")
        return value
    return check


def number(low: float = 0.0, high: float = 1e12, low_inclusive: bool = False) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Invalid(f"expected a number, got {describe(value)}")
        value = float(value)
        too_low = value < low if low_inclusive else value <= low
        if value != value or too_low or value > high:
            bound = f"{'at least' if low_inclusive else 'greater than'} {low:g} and at most {high:g}"
            raise Invalid(f"expected a number {bound}, got {value:g}")
        return value
    return check


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"expected true or false, got {describe(value)}")
    return value


def text(max_len: int = 200) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise Invalid(f"expected a non-empty string, got {describe(value)}")
        if len(value) > max_len:
            raise Invalid(f"expected at most {max_len} characters, got {len(value)}")
        return value
    return check


def name(value: Any) -> str:
    """Names of islands, chips and clusters: they appear in paths and log prefixes."""
    value = text(64)(value)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", value):
        raise Invalid(f"expected letters, digits, '_', '.' or '-' (starting with a letter or digit), got {value!r}")
    return value


def choice(*options: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in options:
            close = difflib.get_close_matches(str(value), options, n=1) if isinstance(value, str) else []
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise Invalid(f"expected one of {', '.join(options)}, got {describe(value)}{hint}")
        return value
    return check


def host(value: Any) -> str:
    value = text(253)(value)
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if not _HOSTNAME.match(value):
        raise Invalid(f"expected an IP address or host name, got {value!r}")
    return value


port = integer(1, 65535)
