"""Safe YAML reading that remembers where every key and value came from.

Rule files are composed into YAML nodes by libyaml (PyYAML's C parser; never
constructed into arbitrary objects), then turned into plain dicts/lists/scalars while
recording the line and column of every path. Scalars follow the YAML 1.2 core schema
(``yes``/``no``/``on`` stay strings). Limits guard against huge files, alias bombs and
deep nesting.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.error import MarkedYAMLError, YAMLError
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from gridflow.errors import Problem

__all__ = ["BAD_SCALAR", "Limits", "Located", "Path", "read_yaml"]

#: how a value YAML itself cannot read (``2027-02-30``) is reported; the file is still read
BAD_SCALAR = "invalid"

Path = tuple[str | int, ...]

_PLAIN_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
    "tag:yaml.org,2002:timestamp",
}
_MAP_TAG = "tag:yaml.org,2002:map"
_SEQ_TAG = "tag:yaml.org,2002:seq"


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
    #: values already reported (an impossible date): schema errors there are not repeated
    bad: set[Path] = field(default_factory=set)

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
        self,
        loc: Path,
        message: str,
        *,
        key: bool = False,
        suggestion: str | None = None,
        severity: str = "error",
    ) -> Problem:
        line, col = self.where(loc, key=key)
        return Problem(self.path, line, col, message, suggestion, severity)


class _LimitExceeded(Exception):
    def __init__(self, node: Node, message: str):
        self.node = node
        super().__init__(message)


_BASE_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Resolver(yaml.resolver.Resolver):
    """YAML 1.2 core schema: only true/false are booleans, no sexagesimal numbers."""


_Resolver.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in entries if tag not in (
        "tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, entries in yaml.resolver.Resolver.yaml_implicit_resolvers.items()
}
_Resolver.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"))
_Resolver.add_implicit_resolver(
    "tag:yaml.org,2002:int", re.compile(r"^(?:[-+]?[0-9]+|0x[0-9a-fA-F]+)$"),
    list("-+0123456789"))
_Resolver.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
               r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."))


class _Loader(_BASE_LOADER, _Resolver):  # type: ignore[misc]
    """libyaml's parser and composer, the safe constructor, YAML 1.2 scalars."""


def _construct_int(loader: Any, node: ScalarNode) -> int:
    text = str(node.value)
    return int(text, 16) if text.startswith("0x") else int(text)  # 1.2: "010" is ten


_Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _depth_problem(text: str, limits: Limits) -> tuple[int, int] | None:
    """Where nesting first exceeds the limit, scanning parser events (no recursion)."""
    depth = 0
    for event in yaml.parse(text, Loader=_Loader):
        if isinstance(event, yaml.MappingStartEvent | yaml.SequenceStartEvent):
            depth += 1
            mark = event.start_mark
            if depth > limits.max_depth + 1 and mark is not None:  # the root is level 1
                return (mark.line + 1, mark.column + 1)
        elif isinstance(event, yaml.MappingEndEvent | yaml.SequenceEndEvent):
            depth -= 1
    return None


def _measure(root: Node, limits: Limits) -> None:
    """Check the expanded size and depth of a composed tree without expanding it.

    Aliases make the tree a DAG: a node's size is computed once and shared, so a
    "billion laughs" document is refused in time proportional to its text, not to the
    billion values it would expand to. Raises :class:`_LimitExceeded`.
    """
    memo: dict[int, tuple[int, int]] = {}  # id(node) -> (values below and itself, height)
    active: set[int] = set()

    def visit(node: Node, depth: int) -> tuple[int, int]:
        key = id(node)
        if key in active:
            raise _LimitExceeded(
                node, "recursive alias (a node that contains itself); refusing to load it"
            )
        if key not in memo:
            if depth > limits.max_depth:
                raise _LimitExceeded(
                    node, f"nesting deeper than {limits.max_depth} levels; refusing to load it"
                )
            active.add(key)
            if isinstance(node, MappingNode):
                children = [v for _k, v in node.value]
            elif isinstance(node, SequenceNode):
                children = list(node.value)
            else:
                children = []
            count, height = 1, 0
            for child in children:
                c, h = visit(child, depth + 1)
                count += c
                height = max(height, h + 1)
                if count > limits.max_nodes:
                    break
            active.discard(key)
            memo[key] = (count, height)
        count, height = memo[key]
        if count > limits.max_nodes:
            raise _LimitExceeded(
                node,
                f"file expands to more than {limits.max_nodes} values "
                "(alias expansion or a runaway file); refusing to load it",
            )
        if depth + height > limits.max_depth:
            raise _LimitExceeded(
                node, f"nesting deeper than {limits.max_depth} levels; refusing to load it"
            )
        return count, height

    visit(root, 0)


class _Builder:
    def __init__(self, loader: Any, located: Located, limits: Limits):
        self.loader = loader
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
        if isinstance(node, MappingNode | SequenceNode):
            expected = _MAP_TAG if isinstance(node, MappingNode) else _SEQ_TAG
            if node.tag != expected:
                line, col = self._mark(node)
                self.problems.append(
                    Problem(self.located.path, line, col, f"unsupported YAML tag '{node.tag}'")
                )
                return None
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
        if node.tag == "tag:yaml.org,2002:str":
            return node.value
        try:
            return self.loader.construct_object(node, deep=True)
        except (YAMLError, ValueError) as exc:  # e.g. 2027-02-30: the rest is still read
            line, col = self._mark(node)
            what = "date" if node.tag == "tag:yaml.org,2002:timestamp" else "value"
            self.problems.append(
                Problem(self.located.path, line, col, f"{BAD_SCALAR} {what} '{node.value}': {exc}")
            )
            self.located.bad.add(path)
            return node.value

    def _mapping(self, node: MappingNode, path: Path, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                line, col = self._mark(key_node)
                self.problems.append(
                    Problem(self.located.path, line, col, "merge keys ('<<') are not supported")
                )
                continue
            if not isinstance(key_node, ScalarNode) or key_node.tag not in _PLAIN_TAGS:
                line, col = self._mark(key_node)
                self.problems.append(
                    Problem(self.located.path, line, col, "mapping keys must be plain scalars")
                )
                continue
            key = str(key_node.value)
            if key[:1] == "\u3000":  # not whitespace to YAML: the key is "　name"
                line, col = self._mark(key_node)
                self.problems.append(Problem(
                    self.located.path, line, col,
                    f"full-width space (U+3000) before '{key.lstrip(_BLANKS)}': indent "
                    "with ordinary spaces"))
                continue
            if key in out:
                line, col = self._mark(key_node)
                self.problems.append(
                    Problem(self.located.path, line, col, f"duplicate key '{key}'")
                )
                continue
            self.located.keys[(*path, key)] = self._mark(key_node)
            out[key] = self.build(value_node, (*path, key), depth + 1)
        return out


def read_yaml(
    path: str, text: bytes | str, limits: Limits | None = None
) -> tuple[Located, list[Problem]]:
    """Parse one file; problems (syntax, tags, limits, duplicate keys) are returned, not raised."""
    limits = limits or Limits()
    located = Located(path=path, data=None)
    size = len(text.encode("utf-8") if isinstance(text, str) else text)
    if size > limits.max_bytes:
        return located, [
            Problem(path, 1, 1, f"file is {size} bytes, over the limit of {limits.max_bytes}")
        ]
    if isinstance(text, bytes):
        raw = text
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            return located, [_not_utf8(path, raw, exc)]
    try:
        too_deep = _depth_problem(text, limits)
        if too_deep is not None:
            line, col = too_deep
            return located, [Problem(
                path, line, col,
                f"nesting deeper than {limits.max_depth} levels; refusing to load it")]
        loader: Any = _Loader(text)  # type: ignore[call-arg]
        try:
            node = loader.get_single_node()
        finally:
            loader.dispose()
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        context = str(exc.context or "")
        if context and exc.context_mark is not None and exc.problem_mark is not None:
            context += f" (line {exc.context_mark.line + 1}),"
        message = " ".join(p for p in (context, str(exc.problem or "")) if p)
        # full-width punctuation typed with a Chinese input method is the usual cause, and
        # YAML reports it lines later, as something else: point at the character instead
        return located, _full_width(path, text, line) or [
            Problem(path, line, col, f"YAML syntax error: {message}")
        ]
    except YAMLError as exc:
        return located, [Problem(path, 1, 1, f"YAML error: {exc}")]
    if node is None:
        located.data = {}
        return located, []
    builder = _Builder(_Loader(""), located, limits)  # type: ignore[call-arg]
    try:
        _measure(node, limits)
        located.data = builder.build(node, (), 0)
    except _LimitExceeded as exc:
        line, col = builder._mark(exc.node)
        return located, [Problem(path, line, col, str(exc))]
    except (YAMLError, ValueError) as exc:
        return located, [Problem(path, 1, 1, f"YAML error: {exc}")]
    if located.data is None and not builder.problems:
        located.data = {}  # an explicitly empty document ('---', '~') is an empty file
    return located, builder.problems


def _not_utf8(path: str, raw: bytes, exc: UnicodeDecodeError) -> Problem:
    """Where the first undecodable byte is, and what to do when the file is GBK."""
    before = raw[: exc.start]
    line = before.count(b"\n") + 1
    col = exc.start - (before.rfind(b"\n") + 1) + 1
    try:
        raw.decode("gb18030")
    except UnicodeDecodeError:
        hint = ""
    else:
        hint = " — it looks like GBK: save the file as UTF-8"
    return Problem(path, line, col, f"not UTF-8 text ({exc.reason}){hint}")


_BLANKS = " \t\u3000"
_FULL_WIDTH_COLON = re.compile(r"^[ \t]*(?:-[ \t]+)?([A-Za-z_][\w\-]*)[ \t]*(：)", re.M)
_FULL_WIDTH_SPACE = re.compile(r"^[ \t]*(?:-[ \t]*)?(\u3000)", re.M)


def _full_width(path: str, text: str, last_line: int) -> list[Problem]:
    """Full-width colons after a key, and full-width spaces in indentation up to the line
    where YAML gave up."""
    found = []
    for rx, message in (
        (_FULL_WIDTH_COLON, "full-width colon '：' after '{key}': YAML needs the ASCII colon ':'"),
        (_FULL_WIDTH_SPACE, "full-width space (U+3000) in the indentation: indent with "
                            "ordinary spaces"),
    ):
        for m in rx.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            if line > last_line and rx is _FULL_WIDTH_SPACE:
                break  # (it may begin a paragraph of a block text further down)
            at = m.start(m.lastindex or 0)
            col = at - (text.rfind("\n", 0, at) + 1) + 1
            key = m.group(1) if rx is _FULL_WIDTH_COLON else ""
            found.append(Problem(path, line, col, message.format(key=key)))
    return sorted(found)


def walk(data: Any, path: Path = ()) -> Iterator[tuple[Path, Any]]:
    """Every (path, value) pair below ``data``, depth first."""
    yield path, data
    if isinstance(data, dict):
        for k, v in data.items():
            yield from walk(v, (*path, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from walk(v, (*path, i))
