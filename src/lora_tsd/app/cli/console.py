"""A quiet console by default: what the libraries underneath print that a user cannot act on is silenced.

Loading a model for a task prints transformers' LOAD REPORT table (a classification head is always newly
initialized: that is what fine-tuning is for), its weight-loading and shard-writing progress bars, bitsandbytes'
note about an optional kernel package, and deprecation warnings from inside torch and transformers. Our own lines
(run folder, accuracy before and after, warnings about the options, where the outputs went, our progress bar)
stay. ``--verbose`` leaves every library at its own default, and shows pip's output during first-use downloads.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings

#: Set for this process and its children (compare workers, pip downloads) when ``--verbose`` is given.
VERBOSE_ENV = "LORA_TSD_VERBOSE"
#: Libraries whose logs and warnings are silenced by default.
THIRD_PARTY = ("transformers", "peft", "accelerate", "huggingface_hub", "bitsandbytes", "datasets", "torch",
               "torchao", "tokenizers", "safetensors")


def add_verbose_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", action="store_true",
                        help="show the logs, warnings and progress bars of transformers, peft, accelerate, "
                             "huggingface_hub and pip (default: only lora-tsd's own lines)")


def verbose_requested() -> bool:
    """Whether this process (or the command that started it) asked for ``--verbose``."""
    return os.environ.get(VERBOSE_ENV, "") == "1"


def configure_console(verbose: bool) -> None:
    """Silence third-party logs, progress bars and warnings (unless ``verbose``). Call before loading models."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
        return
    os.environ.pop(VERBOSE_ENV, None)
    # Read by the libraries at import (and by child processes): set before anything imports them.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for name in THIRD_PARTY:
        logging.getLogger(name).setLevel(logging.ERROR)
    module_pattern = "|".join(THIRD_PARTY)
    warnings.filterwarnings("ignore", module=rf"({module_pattern})(\.|$)")
    if "transformers" in sys.modules:  # imported already, so it read the environment: tell it directly
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
