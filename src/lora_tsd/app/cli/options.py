"""Command-line options generated from the config dataclasses: one flag per option of
:class:`~lora_tsd.app.workflow.config.TrainConfig` (the adapter's options included), with the help text of the
field's metadata and its default stated once; and ``--config`` files (YAML or JSON) with the same names.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any

from lora_tsd.app.workflow.config import ADAPTER_OPTIONS, TrainConfig
from lora_tsd.config import TSDConfig, short_repr
from lora_tsd.errors import ConfigError

# `--r` is ambiguous to launchers that parse abbreviations (torchrun: --rdzv-*, --role, ...): `--rank` works
# everywhere.
FLAG_ALIASES = {"r": ["--rank"]}
REGEX_CHARACTERS = "*()[]|\\^$+?"
#: ``--lr auto``: search the learning rate (app/experiments/lr_search.py) instead of giving one.
LR_AUTO = "auto"


def lr_or_auto(text: str) -> float | str:
    """The ``--lr`` flag's value: a number, or ``auto``."""
    if text == LR_AUTO:
        return LR_AUTO
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: a number or 'auto'") from None


#: Flags whose values parse otherwise than their field's type.
FLAG_TYPES = {"lr": lr_or_auto}


@dataclasses.dataclass(frozen=True)
class OptionSpec:
    """One flat training option: its name, value kind (bool, list, or a scalar type), default and help."""

    name: str
    kind: Any
    default: Any
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _kind(hint: Any) -> Any:
    """``bool``, ``list`` or the scalar type of a field's type hint (``int | None`` → ``int``)."""
    if hint is bool:
        return bool
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if any(typing.get_origin(a) is list for a in args):
            return list
        return _kind(args[0])
    return hint


def train_options(config_cls: type = TrainConfig) -> list[OptionSpec]:
    """Every flat option of a training run, in the order of ``train_config.json``. ``config_cls``: another run
    config with the same flat view of its adapter (``option_defaults``; e.g. the DreamBooth config)."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    adapter_fields = {f.name: f for f in dataclasses.fields(TSDConfig)}
    hints, adapter_hints = typing.get_type_hints(config_cls), typing.get_type_hints(TSDConfig)
    specs = []
    for name, default in config_cls.option_defaults().items():
        adapter_option = name in ADAPTER_OPTIONS
        f = adapter_fields[name] if adapter_option else fields[name]
        hint = adapter_hints[name] if adapter_option else hints[name]
        # A run config may restate an adapter option's help for its models (e.g. DreamBooth's default targets).
        shown = getattr(config_cls, "ADAPTER_HELP", {}).get(name, f.metadata.get("help", ""))
        specs.append(OptionSpec(name, _kind(hint), default, shown))
    if "external_method" not in fields:
        return specs
    specs[[s.name for s in specs].index("method")] = dataclasses.replace(
        specs[[s.name for s in specs].index("method")],
        help="lora, dash (LoRA-Dash), init (LoRA-Init), tsd (LoRA-TSD), pissa, milora, or dora (PEFT's DoRA baseline)")
    return specs


def add_option_flags(parser: argparse._ActionsContainer, skip: tuple[str, ...] = (), dest_prefix: str = "",
                     defaults_shown: bool = True, config_cls: type = TrainConfig) -> None:
    """One flag per training option (not in ``skip``), parsed to ``None`` when absent so that a ``--config`` file
    and the config's own defaults fill in the rest. The help states each default once."""
    for spec in train_options(config_cls):
        if spec.name in skip:
            continue
        shown = spec.help
        if defaults_shown and spec.default is not None and spec.kind is not list:
            shown += f" (default: {spec.default})"
        flags = [spec.flag, *FLAG_ALIASES.get(spec.name, [])]
        dest = dest_prefix + spec.name
        if spec.kind is bool:
            parser.add_argument(*flags, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=shown)
        elif spec.kind is list:
            parser.add_argument(*flags, dest=dest, nargs="+", default=None, help=shown, metavar=spec.name.upper())
        else:
            parser.add_argument(*flags, dest=dest, type=FLAG_TYPES.get(spec.name, spec.kind), default=None, help=shown,
                                metavar=spec.name.upper())


def option_values(args: argparse.Namespace, dest_prefix: str = "", config_cls: type = TrainConfig) -> dict[str, Any]:
    """The options given as flags (``None`` = not given), with a single regex target kept as a string."""
    values = {}
    for spec in train_options(config_cls):
        value = getattr(args, dest_prefix + spec.name, None)
        if value is not None:
            values[spec.name] = value
    return normalize_targets(values)


def normalize_targets(values: dict[str, Any]) -> dict[str, Any]:
    """``target_modules``: one flag value with regex characters is a regex; a comma list in a file is a list."""
    targets = values.get("target_modules")
    if isinstance(targets, list) and len(targets) == 1 and any(c in targets[0] for c in REGEX_CHARACTERS):
        values["target_modules"] = targets[0]
    elif isinstance(targets, str) and "," in targets:
        values["target_modules"] = [t.strip() for t in targets.split(",")]
    return values


def load_config_file(path: str, config_cls: type = TrainConfig) -> dict[str, Any]:
    """The options of a YAML or JSON file (keys as the flags, with ``_`` or ``-``); unknown keys refused."""
    from lora_tsd.app.cli.config_file import read_config_mapping

    data = read_config_mapping(path)  # strict: UTF-8, no duplicate keys, bounded nesting (config_file.py)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config file {path!r} must hold a mapping of option names to values")
    known = config_cls.option_names()
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) in {path}: {', '.join(map(short_repr, unknown))}; valid keys: "
                          f"{', '.join(sorted(known))}")
    return normalize_targets(data)
