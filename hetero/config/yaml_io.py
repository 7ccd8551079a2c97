"""Read one YAML file safely: bounded size, no Python objects, no alias bombs.

Returns plain data (dicts, lists, scalars) plus the line of every field path, so
that later errors can say where in the file the problem is.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import yaml

from hetero.errors import ConfigError

MAX_FILE_BYTES = 1 << 20          # a fleet description is kilobytes; refuse megabytes
MAX_EXPANDED_NODES = 100_000       # aliases may repeat a node, but not explode


@dataclass(frozen=True)
class YamlDocument:
    source: str            # the path as the user gave it
    data: object
    lines: dict            # field path ("islands[0].name") -> 1-based line


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (list, dict)):
                raise yaml.constructor.ConstructorError(
                    None, None, "a mapping key must be a plain value", key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key]})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str) -> YamlDocument:
    text = _read_text(path)
    if not text.strip():
        raise ConfigError(path, "", "the file is empty; expected a YAML mapping")
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise ConfigError(path, "", "the file holds no YAML document; expected a mapping")
        _check_expansion(path, node)
        data = loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(path, _where(exc), _describe(exc)) from None
    except RecursionError:
        raise ConfigError(path, "", "nests too deeply to be a configuration file") from None
    finally:
        loader.dispose()
    lines: dict = {}
    _record_lines(node, "", lines, set())
    return YamlDocument(source=path, data=data, lines=lines)


def _read_text(path: str) -> str:
    if not os.path.exists(path):
        raise ConfigError(path, "", "no such file")
    if os.path.isdir(path):
        raise ConfigError(path, "", "is a directory; expected a YAML file")
    try:
        size = os.path.getsize(path)
        if size > MAX_FILE_BYTES:
            raise ConfigError(path, "", f"is {size} bytes; a configuration file may be at most {MAX_FILE_BYTES}")
        with open(path, "rb") as handle:
            raw = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError(path, "", f"cannot be read: {exc.strerror}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, "", f"is not UTF-8 text (bad byte at offset {exc.start})") from None


def _check_expansion(path: str, root) -> None:
    """Refuse alias cycles and 'billion laughs' in one pass over the distinct nodes.

    Each node is visited once however often aliases repeat it, so the cost is
    linear in the file, not in the expansion it refuses. A node's expanded size
    is one plus its children's; a child that is still on the current path is a
    cycle."""
    sizes: dict = {}     # id(node) -> expanded node count, once its children are done
    on_path: set = set()
    stack = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            total = 1 + sum(sizes[id(child)] for child in _children(node))
            if total > MAX_EXPANDED_NODES:
                raise ConfigError(path, "", f"expands to more than {MAX_EXPANDED_NODES} YAML nodes "
                                            "(aliases repeated too often); refusing to load it")
            sizes[key] = total
            continue
        if key in sizes:
            continue
        on_path.add(key)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in on_path:
                raise ConfigError(path, "", f"line {child.start_mark.line + 1}: an alias refers to itself")
            if id(child) not in sizes:
                stack.append((child, False))


def _children(node) -> list:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [n for key_value in node.value for n in key_value]
    return []


def _record_lines(node, path: str, lines: dict, seen: set) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if id(node) in seen:
        return  # an alias: its lines were recorded under the anchor's path
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
            _record_lines(value_node, f"{path}.{key}" if path else str(key), lines, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, child in enumerate(node.value):
            _record_lines(child, f"{path}[{index}]", lines, seen)


def _where(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    return f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""


def _describe(exc: yaml.YAMLError) -> str:
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context = getattr(exc, "context", None)
    if "could not determine a constructor" in problem:
        tag = problem.split("tag", 1)[-1].strip(" '").replace("tag:yaml.org,2002:", "!!")
        return f"YAML tag {tag} is not allowed: configuration files hold plain data only"
    return f"invalid YAML: {context}, {problem}" if context else f"invalid YAML: {problem}"
