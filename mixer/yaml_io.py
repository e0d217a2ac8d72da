"""The one YAML reader: run configs (``mixer.config``) and search spaces (``sweep.space``) use it.

PyYAML follows YAML 1.1, whose floats need a dot, so it reads ``lr: 1e-4`` as the string
``"1e-4"``; this loader reads it as a float, as YAML 1.2 does. It also refuses duplicate keys
instead of silently keeping the last one. Otherwise it is PyYAML's safe loader.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

__all__ = ["YamlError", "load_yaml"]


class YamlError(ValueError):
    """A YAML file cannot be read or is not valid YAML; the message starts with the file name."""


@functools.cache
def _loader() -> type:
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
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
                    None, None, f"duplicate key {key!r} (line {line})", key_node.start_mark)
            seen.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return Loader


def load_yaml(path: str | Path) -> Any:
    """The document in the YAML file at ``path`` (``1e-4`` is a float; duplicate keys fail).

    Raises:
        YamlError: ``"<path>: cannot read: ..."`` or ``"<path>: not valid YAML: ..."``.
    """
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise YamlError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        return yaml.load(text, Loader=_loader())  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise YamlError(f"{path}: not valid YAML: {exc}") from None
