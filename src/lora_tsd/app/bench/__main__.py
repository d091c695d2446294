"""``python -m lora_tsd.app.bench``: the same as ``lora-tsd bench``."""

from __future__ import annotations

from .cli import main

raise SystemExit(main())
