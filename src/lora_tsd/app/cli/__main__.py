"""``python -m lora_tsd.app.cli``: the ``lora-tsd`` command."""

import sys

from lora_tsd.app.cli.main import main

sys.exit(main())
