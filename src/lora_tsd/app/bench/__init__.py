"""Performance benchmarks: ``lora-tsd bench`` (every ratio of issue 5 on the CPU) and the pieces of the GPU bench
script ``bench/gpu_bench.py``.

- :mod:`.cli`: the ``lora-tsd bench`` command line (``main(argv)``) and the order of its sections;
- :mod:`.settings`: the sizes and repetitions of a run; :mod:`.report`: its rows, tables and JSON;
- :mod:`.measure`: interleaved timing (CPU clock, CUDA events) and peak memory; :mod:`.machine`: cores, versions;
- :mod:`.workloads`: the timed models (one layer, the authors' dense dash, our adapters, PEFT's LoRA) and the
  pre-launch snapshot; :mod:`.steps`: one training step and the comparison of several;
- the CPU sections: :mod:`.layer_cases`, :mod:`.model_cases`, :mod:`.switch_cases`, :mod:`.inference`,
  :mod:`.forward_impls`, :mod:`.sweep`;
- the GPU sections: :mod:`.gpu_steps` (training steps, results), :mod:`.gpu_svd` (SVD drivers, the switch).

Everything here but the CLI's optional extras (transformers, peft, matplotlib, imported on use) needs only torch
and the core :mod:`lora_tsd`, so that the GPU script runs on a machine with nothing else installed.
"""
