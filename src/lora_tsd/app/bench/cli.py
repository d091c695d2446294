"""``lora-tsd bench``: every performance ratio of issue 5, measured in one run on the CPU.

Targets (issue 5), each printed as one row of the result table:

1. A training step (forward + backward + AdamW) of a dash-phase layer vs a plain-LoRA layer of the same rank
   at LLaMA-7B shapes (4096×4096, 11008×4096; 2,048 tokens, fp32): time ≤ 1.03×, peak memory ≤ 1.02×; the
   authors' dense-dash pattern (``x @ (U_s diag(c) V_sᵀ)ᵀ`` built every forward) in the same table; the whole
   MiniLM-shaped model dash vs lora ≤ 1.05× time.
2. Our ``lora`` vs PEFT's LoRA (``peft.tuners.lora.Linear``), same shapes and rank: ≤ 1.02× time and memory,
   per layer and for whole MiniLM- and SmolLM2-shaped models.
3. The switch on all 210 target matrices of SmolLM2's shapes: cold vs the sum of one fp32 thin SVD per matrix
   plus the low-rank projections; warm (content-keyed SVD cache) < 2 s; peak extra memory of the switch vs the
   peak of one layer's SVD + projections.
4. Inference: merged model vs base model (structure and time), unmerged forward overhead.
5. The switch split across 2 gloo processes sharing the cores vs the 1-process switch (≤ 0.6×).

Method
------
- Timing: ``time.perf_counter`` around whole steps; the variants of one comparison run interleaved (A, B, C,
  then B, C, A, ...; warm-up rounds first) and each variant's median is reported; ratios are ratios of
  medians, with the range of the per-round paired ratios beside them as a noise indicator.
- Peak memory of a step = the bytes alive before it (parameters, buffers, optimizer state, inputs; counted
  from the tensors themselves, shared storage once) + the peak of the bytes allocated during the step above
  that level, read from torch's own CPU allocator accounting (``torch.profiler`` with ``profile_memory``:
  every allocation and free of the c10 CPU allocator with the running total). ``tracemalloc`` cannot see
  these allocations. A cross-check runs the same step again and reads the growth of the process's peak
  resident set (``/proc/self/status`` VmHWM, reset through ``/proc/self/clear_refs``) with glibc's mmap
  threshold lowered to 64 KiB for the measurement, so that freed tensors leave the resident set at once.
- Weights are random (the costs do not depend on the values); the dash directions of the layer-level cases
  are random orthonormal columns (a thin SVD of a 4096×4096 fp32 matrix alone takes minutes on two cores;
  the switch itself is measured in target 3, the whole-model cases use the real switch).

Run ``lora-tsd bench -- --help`` for the options; ``--quick`` runs every row on tiny shapes in seconds
(a smoke test; its numbers mean nothing).

Modules: :mod:`.settings` (sizes), :mod:`.measure` (timing, memory), :mod:`.report` (rows, tables),
:mod:`.layer_cases`, :mod:`.model_cases`, :mod:`.switch_cases`, :mod:`.inference`, :mod:`.forward_impls`,
:mod:`.sweep` (the sections); this one is the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from lora_tsd.switching import intra_op_threads

from .forward_impls import run_impl
from .inference import run_inference
from .layer_cases import run_layers
from .machine import available, machine_info, usable_cores
from .measure import warm_profiler
from .model_cases import run_models
from .report import ROWS, Report
from .settings import Settings
from .sweep import plot_sweep, run_sweep, sweep_tables
from .switch_cases import run_switch

SECTIONS = ("layers", "models", "switch", "inference")
EXTRA_SECTIONS = ("impl",)


def build_parser() -> argparse.ArgumentParser:
    """The options of ``lora-tsd bench``."""
    p = argparse.ArgumentParser(
        prog="lora-tsd bench",
        description="Measure issue 5's performance ratios on the CPU in one run (interleaved repetitions, "
                    "medians): dash vs lora and the authors' dense dash (target 1), ours vs PEFT (2), the "
                    "switch cold / warm / memory (3), merged and unmerged inference (4). Prints markdown "
                    "tables on stdout, progress on stderr.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="every row on tiny shapes with few repetitions (seconds; a smoke test, not a measurement)")
    p.add_argument("--only", nargs="+", choices=SECTIONS + EXTRA_SECTIONS, default=list(SECTIONS),
                   metavar="SECTION",
                   help=f"run only these sections ({', '.join(SECTIONS)}; rows of the others print n/a), or "
                        "'impl': compare candidate forward implementations of the adapter layer (not run by "
                        "default)")
    p.add_argument("--sweep", action="store_true",
                   help="also sweep the step cost over layer size, s and r (about 3 more minutes on 2 cores)")
    p.add_argument("--sweep-only", action="store_true", help="run the sweep and nothing else")
    p.add_argument("--plot", type=Path, default=None, metavar="PATH", help="write the sweep's plot (PNG) here")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write every number as JSON")
    p.add_argument("--tokens", type=int, default=None, help="tokens per layer-level step (default 2048)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per variant (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up rounds (default 1)")
    p.add_argument("--switch-reps", type=int, default=None, help="repetitions of the cold switch (default 2)")
    p.add_argument("--switch-layers", type=int, default=None,
                   help="SmolLM2 layers whose 7 target matrices the switch section decomposes (default 30: 210)")
    p.add_argument("-r", "--rank", type=int, default=None, help="LoRA rank r (default 8)")
    p.add_argument("-s", "--dash", type=int, default=None, help="dash directions s (default 8)")
    p.add_argument("--smol-layers", type=int, default=None,
                   help="decoder layers of the SmolLM2-shaped model (default 30, the real depth)")
    p.add_argument("--smol-batch", type=int, nargs=2, default=None, metavar=("BATCH", "SEQ"),
                   help="SmolLM2 batch (default 4 128)")
    p.add_argument("--minilm-batch", type=int, nargs=2, default=None, metavar=("BATCH", "SEQ"),
                   help="MiniLM batch (default 16 128)")
    p.add_argument("--input-grad", action="store_true",
                   help="layer-level inputs require grad (a layer inside a network: backward also computes "
                        "the input gradient, one more full matmul for every variant); default off, the "
                        "stricter case for the adapters' relative overhead")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: the usable CPU cores)")
    p.add_argument("--cache-root", type=Path, default=None,
                   help="folder for the temporary SVD cache of target 3 (default: the system temp folder)")
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The run's :class:`Settings`: the defaults (or ``--quick``'s) with the options given on top."""
    st = Settings.quick_settings() if args.quick else Settings()
    for name in ("tokens", "reps", "warmup", "switch_reps", "rank", "dash"):
        value = getattr(args, name)
        if value is not None:
            setattr(st, name, value)
    if args.switch_layers is not None:
        st.switch_layers = args.switch_layers
    if args.smol_layers is not None:
        st.smol = {**st.smol, "num_hidden_layers": args.smol_layers}
    if args.smol_batch is not None:
        st.smol_batch = tuple(args.smol_batch)
    if args.minilm_batch is not None:
        st.minilm_batch = tuple(args.minilm_batch)
    st.input_grad = args.input_grad
    st.threads = args.threads or usable_cores()
    return st


def main(argv: list[str] | None = None) -> int:
    """Run the bench; print the tables. Returns the process exit status (0)."""
    if argv and argv[0] == "--":  # `lora-tsd bench -- --quick`: the separator reaches us with the options
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    st = settings_from_args(args)
    if st.reps < 1 or st.tokens < 1 or st.rank < 1 or st.dash < 1:
        print("bench: --reps, --tokens, --rank and --dash must be ≥ 1", file=sys.stderr)
        return 2
    # Leave the caller's process as it was (thread count, global RNG): the bench also runs inside pytest.
    with intra_op_threads(st.threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return run(args, st, argv if argv is not None else sys.argv[1:])


def run(args: argparse.Namespace, st: Settings, argv: list[str]) -> int:
    """The sections ``args`` asks for, then the tables on stdout (and ``--json``, ``--plot``). Returns 0."""
    warm_profiler()
    report = Report(st)
    info = machine_info(st.threads)
    t_start = time.perf_counter()
    peft_ok, hf_ok = available("peft"), available("transformers")
    sections = [] if args.sweep_only else list(args.only)
    cmd = "python -m lora_tsd.bench " + " ".join(argv)
    print(f"# lora-tsd bench: `{cmd.strip()}`\n")
    print(f"machine: {info['nproc']} CPUs ({info['cpus_usable']} usable), {info['cpu']}; torch {info['torch']}, "
          f"{st.threads} threads; Python {info['python']}; load average at start {info['loadavg']}")
    print(f"settings: r={st.rank}, s={st.dash}, {st.tokens} tokens per layer step, {st.reps} timed reps "
          f"(+{st.warmup} warm-up), fp32, input grad {'on' if st.input_grad else 'off'}"
          f"{', QUICK (tiny shapes; numbers mean nothing)' if st.quick else ''}\n", flush=True)
    report.notes.append(f"layer A = {st.layer_shapes[0][0]}×{st.layer_shapes[0][1]}, layer B = "
                        f"{st.layer_shapes[1][0]}×{st.layer_shapes[1][1]} (out×in), no bias, fp32.")
    if "layers" in sections:
        run_layers(report, st, peft_ok)
    if "models" in sections:
        run_models(report, st, peft_ok, hf_ok)
    if "switch" in sections:
        run_switch(report, st, args.cache_root)
    if "inference" in sections:
        run_inference(report, st, hf_ok)
    impl = run_impl(st) if "impl" in sections else None
    for key, _, _ in ROWS:  # rows of sections not run
        row = report.rows[key]
        if row.value is None and not row.note:
            row.note = "section not run"
    sweep = None
    if args.sweep or args.sweep_only:
        sweep = run_sweep(report, st)
    elapsed = time.perf_counter() - t_start
    report.notes.append(f"wall time {elapsed:.0f} s; load average at end {os.getloadavg()}")
    if sections:
        print(report.tables())
    if impl is not None:
        print()
        print(impl)
    if sweep is not None:
        print()
        print(sweep_tables(sweep))
        if args.plot is not None:
            plot_sweep(sweep, args.plot, st)
            print(f"\nplot written to {args.plot}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report.to_json(), indent=1, default=str) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
