"""Safe YAML reading that remembers where every key and value came from.

Rule files are composed into ruamel.yaml nodes (never constructed into arbitrary
objects), then turned into plain dicts/lists/scalars while recording the line and
column of every path. Limits guard against huge files, alias bombs and deep nesting.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from gridflow.errors import Problem

__all__ = ["Limits", "Located", "Path", "read_yaml"]

Path = tuple[str | int, ...]

_PLAIN_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:timestamp",
}


@dataclass(frozen=True)
class Limits:
    """Bounds on what a single rule file may cost to read."""

    max_bytes: int = 8 * 1024 * 1024
    max_nodes: int = 500_000
    max_depth: int = 48


@dataclass
class Located:
    """Plain data from one YAML file plus the position of each value and key."""

    path: str
    data: Any
    values: dict[Path, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Path, tuple[int, int]] = field(default_factory=dict)

    def where(self, loc: Path, *, key: bool = False) -> tuple[int, int]:
        """Line/col of ``loc``, falling back to the nearest located ancestor."""
        table = self.keys if key else self.values
        probe = tuple(loc)
        while probe:
            if probe in table:
                return table[probe]
            if not key and probe in self.keys:
                return self.keys[probe]
            probe = probe[:-1]
        return (1, 1)

    def problem(
        self, loc: Path, message: str, *, key: bool = False, suggestion: str | None = None,
        severity: str = "error",
    ) -> Problem:
        line, col = self.where(loc, key=key)
        return Problem(self.path, line, col, message, suggestion, severity)


class _LimitExceeded(Exception):
    def __init__(self, node: Node, message: str):
        self.node = node
        super().__init__(message)


class _Builder:
    def __init__(self, yaml: YAML, located: Located, limits: Limits):
        self.yaml = yaml
        self.located = located
        self.limits = limits
        self.count = 0
        self.problems: list[Problem] = []

    def _mark(self, node: Node) -> tuple[int, int]:
        return (node.start_mark.line + 1, node.start_mark.column + 1)

    def build(self, node: Node, path: Path, depth: int) -> Any:
        self.count += 1
        if self.count > self.limits.max_nodes:
            raise _LimitExceeded(
                node,
                f"file expands to more than {self.limits.max_nodes} values "
                "(alias expansion or a runaway file); refusing to load it",
            )
        if depth > self.limits.max_depth:
            raise _LimitExceeded(
                node, f"nesting deeper than {self.limits.max_depth} levels; refusing to load it"
            )
        self.located.values[path] = self._mark(node)
        if isinstance(node, MappingNode):
            return self._mapping(node, path, depth)
        if isinstance(node, SequenceNode):
            return [self.build(item, (*path, i), depth + 1) for i, item in enumerate(node.value)]
        assert isinstance(node, ScalarNode)
        if node.tag not in _PLAIN_TAGS:
            line, col = self._mark(node)
            self.problems.append(
                Problem(self.located.path, line, col, f"unsupported YAML tag '{node.tag}'")
            )
            return None
        return self.yaml.constructor.construct_object(node, deep=True)

    def _mapping(self, node: MappingNode, path: Path, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                line, col = self._mark(key_node)
                self.problems.append(
                    Problem(self.located.path, line, col, "merge keys ('<<') are not supported")
                )
                continue
            if not isinstance(key_node, ScalarNode):
                line, col = self._mark(key_node)
                self.problems.append(
                    Problem(self.located.path, line, col, "mapping keys must be plain scalars")
                )
                continue
            key = str(key_node.value)
            if key in out:
                line, col = self._mark(key_node)
                self.problems.append(
                    Problem(self.located.path, line, col, f"duplicate key '{key}'")
                )
                continue
            self.located.keys[(*path, key)] = self._mark(key_node)
            out[key] = self.build(value_node, (*path, key), depth + 1)
        return out


def read_yaml(path: str, text: bytes | str, limits: Limits | None = None) -> tuple[Located, list[Problem]]:
    """Parse one file; problems (syntax, tags, limits, duplicate keys) are returned, not raised."""
    limits = limits or Limits()
    located = Located(path=path, data=None)
    size = len(text.encode("utf-8") if isinstance(text, str) else text)
    if size > limits.max_bytes:
        return located, [
            Problem(path, 1, 1, f"file is {size} bytes, over the limit of {limits.max_bytes}")
        ]
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            return located, [Problem(path, 1, 1, f"not UTF-8 text: {exc.reason} at byte {exc.start}")]
    yaml = YAML(typ="safe", pure=True)
    try:
        node = yaml.compose(io.StringIO(text))
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        message = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        return located, [Problem(path, line, col, f"YAML syntax error: {message}")]
    except YAMLError as exc:
        return located, [Problem(path, 1, 1, f"YAML error: {exc}")]
    if node is None:
        located.data = {}
        return located, []
    builder = _Builder(yaml, located, limits)
    try:
        located.data = builder.build(node, (), 0)
    except _LimitExceeded as exc:
        line, col = builder._mark(exc.node)
        return located, [Problem(path, line, col, str(exc))]
    except (YAMLError, ValueError) as exc:
        return located, [Problem(path, 1, 1, f"YAML error: {exc}")]
    return located, builder.problems


def walk(data: Any, path: Path = ()) -> Iterator[tuple[Path, Any]]:
    """Every (path, value) pair below ``data``, depth first."""
    yield path, data
    if isinstance(data, dict):
        for k, v in data.items():
            yield from walk(v, (*path, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from walk(v, (*path, i))
