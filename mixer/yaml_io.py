"""The one YAML reader: run configs (``mixer.config``) and search spaces (``sweep.space``) use it.

PyYAML's safe loader, except that ``lr: 1e-4`` is a float (as in YAML 1.2, not the string of YAML
1.1), duplicate keys fail, and hostile files are refused before they cost anything: anything but a
regular file, over ``MAX_BYTES``, not UTF-8, nested deeper than ``MAX_NESTING``, or with an alias."""

from __future__ import annotations

import functools
import os
import re
import reprlib
import stat
from pathlib import Path
from typing import Any

__all__ = ["MAX_BYTES", "MAX_NESTING", "YamlError", "load_yaml", "shorten"]

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxlong = _REPR.maxother = 80


def shorten(value: object, *, limit: int = 80) -> str:
    """``repr(value)`` cut to about ``limit`` characters: a value quoted in an error cannot flood it."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."

# A space or a run config is a few kB, nested a few levels deep; past these it is something else
# (and PyYAML's scanner slows down with each level of nesting).
MAX_BYTES = 1 << 20
MAX_NESTING = 32


class YamlError(ValueError):
    """A YAML file cannot be read or is not valid YAML; the message starts with the file name."""


@functools.cache
def _loader() -> type:
    import yaml

    class Loader(yaml.SafeLoader):
        nesting = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent):
                problem = f"aliases are not allowed (*{event.anchor[:80]})"
            elif self.nesting >= MAX_NESTING:
                problem = f"nested more than {MAX_NESTING} levels deep"
            else:
                self.nesting += 1
                try:
                    return super().compose_node(parent, index)
                finally:
                    self.nesting -= 1
            raise yaml.composer.ComposerError(None, None, problem, event.start_mark)

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
        list("-+0123456789."),
    )

    def construct_mapping(loader: Any, node: Any, deep: bool = False) -> dict[Any, Any]:
        loader.flatten_mapping(node)
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                line = key_node.start_mark.line + 1
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {shorten(key)} (line {line})", key_node.start_mark)
            seen.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return Loader


def load_yaml(path: str | Path) -> Any:
    """The document in the YAML file at ``path`` (``1e-4`` is a float; duplicate keys and aliases fail).

    Raises YamlError, its message starting with the path: "cannot read", "not valid YAML" and so on."""
    import yaml

    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens at once, and is refused below
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise YamlError(f"{path}: not a regular file (a directory, a device or a pipe)")
            with open(fd, "rb", closefd=False) as f:
                raw = f.read(MAX_BYTES + 1)  # never more: /dev/zero or a growing file stop here
        finally:
            os.close(fd)
    except OSError as exc:
        raise YamlError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_BYTES:
        raise YamlError(f"{path}: larger than {MAX_BYTES >> 20} MiB, too large for a space or run config")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise YamlError(f"{path}: not UTF-8 text (byte {exc.start} is 0x{raw[exc.start]:02x})") from None
    try:
        return yaml.load(text, Loader=_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise YamlError(f"{path}: not valid YAML: {exc}") from None
    except ValueError as exc:  # what Python cannot build: an integer of over 4,300 digits, a 13th month
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise YamlError(f"{path}: not valid YAML: {first[:120]}") from None
