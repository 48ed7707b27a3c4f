"""routes.yaml as plain values plus the line of every key and item, and where an error points.

Knows YAML and locations only: what the keys mean belongs to model.py and load.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from ..errors import ConfigError


@dataclass(frozen=True)
class Location:
    """Where a value was written: `routes.yaml:12: routes.docker.io.credentials.password_env`."""

    file: str
    line: int | None
    key: str

    def error(self, message: str) -> ConfigError:
        return ConfigError(message, file=self.file, line=self.line, key=self.key)


class Document:
    """The values of one routes.yaml, with the line of every mapping key and sequence item."""

    def __init__(self, file: str, data: Any, lines: dict[str, int]) -> None:
        self.file = file
        self.data = data
        self._lines = lines

    @classmethod
    def parse(cls, text: str, file: str) -> Document:
        loader = yaml.SafeLoader(text)
        lines: dict[str, int] = {}
        try:
            node = loader.get_single_node()
            if node is None:
                raise ConfigError("empty file: it needs at least a routes: mapping", file=file)
            data = _convert(loader, file, lines, node, "")
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark
            raise ConfigError(f"not valid YAML: {exc.problem}", file=file,
                              line=mark.line + 1 if mark else None) from None
        finally:
            loader.dispose()
        return cls(file, data, lines)

    def at(self, key: str) -> Place:
        return Place(self, key)

    def line(self, key: str) -> int | None:
        """The line of `key`, or of the nearest enclosing key written in the file."""
        line = self._lines.get(key)
        probe = key
        while line is None and "." in probe:
            probe = probe.rsplit(".", 1)[0]
            line = self._lines.get(probe)
        return line


@dataclass(frozen=True)
class Place:
    """A key path in a document (`routes.ghcr.io.hosts[1]`): what value parsers raise errors at."""

    document: Document
    key: str

    def child(self, name: str) -> Place:
        """`name` is a key (`tag_ttl`) or a list index (`[1]`)."""
        if name.startswith("[") or not self.key:
            return Place(self.document, self.key + name)
        return Place(self.document, f"{self.key}.{name}")

    def location(self) -> Location:
        return Location(self.document.file, self.document.line(self.key), self.key)

    def error(self, message: str) -> ConfigError:
        return self.location().error(message)


def _convert(loader: yaml.SafeLoader, file: str, lines: dict[str, int], node: yaml.Node,
             path: str) -> Any:
    lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise ConfigError("keys must be plain strings", file=file,
                                  line=key_node.start_mark.line + 1, key=path)
            key = str(key_node.value)
            sub = f"{path}.{key}" if path else key
            if key in out:
                raise ConfigError("duplicate key", file=file,
                                  line=key_node.start_mark.line + 1, key=sub)
            lines[sub] = key_node.start_mark.line + 1
            out[key] = _convert(loader, file, lines, value_node, sub)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(loader, file, lines, item, f"{path}[{i}]")
                for i, item in enumerate(node.value)]
    assert isinstance(node, yaml.ScalarNode)
    return loader.construct_object(node)
