"""The ``lora-tsd`` command line."""

from lora_tsd.app.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
