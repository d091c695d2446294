"""``lora-tsd train --lr auto``: the flags of the learning-rate search and the command that runs it
(:mod:`lora_tsd.app.experiments.lr_search`)."""

from __future__ import annotations

import argparse
from typing import Any

from lora_tsd.app.cli.options import LR_AUTO
from lora_tsd.app.workflow.config import LR_CANDIDATES, TrainConfig
from lora_tsd.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lr-candidates", nargs="+", type=float, default=None, metavar="LR",
                        help="with --lr auto: the learning rates tried (default: "
                             f"{' '.join(f'{c:g}' for c in LR_CANDIDATES)})")
    parser.add_argument("--lr-search-steps", type=int, default=None, metavar="STEPS",
                        help="with --lr auto: optimizer steps of each trial (default: steps//4)")


def check_flags(args: argparse.Namespace, values: dict[str, Any]) -> bool:
    """Whether the run searches its lr; refuses the search flags without ``--lr auto``, and ``--resume`` with it."""
    auto = values.get("lr") == LR_AUTO
    if not auto and (args.lr_candidates is not None or args.lr_search_steps is not None):
        raise ConfigError("--lr-candidates and --lr-search-steps need --lr auto")
    if auto and args.resume is not None:
        raise ConfigError("--lr auto cannot resume a run: a resumed run keeps the lr it was started with")
    return auto


def run_lr_auto(args: argparse.Namespace, cfg: TrainConfig) -> dict[str, Any]:
    """The search, then the full run (``cfg``'s lr is replaced by the chosen one); its summary."""
    from lora_tsd.app.experiments.lr_search import train_with_lr_search

    return train_with_lr_search(cfg, candidates=args.lr_candidates or LR_CANDIDATES,
                                search_steps=args.lr_search_steps)
