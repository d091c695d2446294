"""The sections of docs/results.md and the README headline, rendered from the measured files in
docs/results (run ``python docs/results/build.py``); the numbers come from the experiments' own statistics
and formatting (:mod:`lora_tsd.app.experiments.statistics`, :mod:`lora_tsd.app.experiments.grid_report`)."""
