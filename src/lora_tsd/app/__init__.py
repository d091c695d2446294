"""The lora-tsd application: the ``lora-tsd`` command line and everything behind it.

It builds on the core library (:mod:`lora_tsd`) and is never imported by it. Subpackages, from the top down:

- :mod:`lora_tsd.app.cli`: argument parsing and the commands;
- :mod:`lora_tsd.app.experiments`: comparison grids, statistics, reports, spectra, TSD capture, plots;
- :mod:`lora_tsd.app.bench`: performance benchmarks;
- :mod:`lora_tsd.app.workflow`: the training run (config, loop, checkpoints, back ends, runners, batching);
- :mod:`lora_tsd.app.assets`: embedded models, the download cache, tasks.
"""
