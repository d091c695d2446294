"""Reading a ``--config`` file strictly: UTF-8 text, YAML (a superset of JSON) without duplicate keys, not nested
deeper than any option needs, and error messages of bounded size. What the file's values mean is checked by
:class:`~lora_tsd.app.workflow.config.TrainConfig`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_tsd.config import short_repr
from lora_tsd.errors import ConfigError

__all__ = ["read_config_mapping"]


def _strict_loader() -> type:
    import yaml

    class StrictLoader(yaml.SafeLoader):
        """``yaml.SafeLoader`` that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

        def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, list | dict):  # unhashable keys: the option check refuses them by name
                    continue
                if key in seen:
                    raise ConfigError(f"key {short_repr(key)} is given twice (line {key_node.start_mark.line + 1}); "
                                      "give each option once")
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


def read_config_mapping(path: str) -> Any:
    """The parsed content of the YAML/JSON file ``path`` (``None`` when empty).

    Raises:
        ConfigError: the path is missing or not a file, the bytes are not UTF-8, the YAML is invalid, a key is
            repeated, or the nesting is too deep to parse.
    """
    import yaml

    file = Path(path)
    if not file.exists():
        raise ConfigError(f"--config file {path!r} does not exist")
    if not file.is_file():
        raise ConfigError(f"--config {path!r} is not a file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"--config file {path!r} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"--config file {path!r} cannot be read: {err.strerror or err}") from None
    try:
        return yaml.load(text, Loader=_strict_loader())  # noqa: S506 - a SafeLoader subclass
    except ConfigError as err:
        raise ConfigError(f"--config file {path!r}: {err}") from None
    except RecursionError:
        raise ConfigError(f"--config file {path!r} is nested too deeply to be a config file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"--config file {path!r} is not valid YAML/JSON: {short_repr(str(err), 300)}") from None
