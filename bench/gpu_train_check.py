"""End-to-end check of `lora-tsd train` on a CUDA GPU with tiny random models (nothing is downloaded).

    PYTHONPATH=src python bench/gpu_train_check.py            # on the GPU machine; writes $OUT/gpu_train_check.json
    PYTHONPATH=src python bench/gpu_train_check.py --device cpu   # the same runs on a CPU (a smoke test)

The test suite runs on CPUs only; this script checks what only a GPU exercises: the accelerate loop on CUDA,
the switch through the checked cuSOLVER SVD, bf16 autocast, and that an adapter trained on the GPU loads and
evaluates on a CPU. For every run it asserts the switch at optimizer step t (dash, init, tsd), then runs
`lora-tsd eval RUN` on the CPU (CUDA hidden) and compares its test accuracy with the run's summary (equal up
to ``--tolerance``: GPU and CPU kernels round differently, which can flip an example near the decision
boundary). Exit status 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # tiny_assets: the tiny real-format models of the test suite

# (model kind, task kind, method, extra flags)
RUNS = [
    ("encoder", "cls", "lora", []),
    ("encoder", "cls", "dash", []),
    ("encoder", "cls", "init", []),
    ("encoder", "cls", "tsd", []),
    ("encoder", "cls", "dash", ["--bf16"]),
    ("decoder", "mc", "dash", []),
    ("decoder", "mc", "tsd", ["--bf16"]),
]


def _cell(row: dict, key: str, fmt: str = "") -> str:
    """A table cell: "–" when the run never got that far, else the value (``None`` as "None": no switch)."""
    if key not in row:
        return "–"
    return "None" if row[key] is None else format(row[key], fmt)


def cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_tsd.app.cli", *args], capture_output=True, text=True, env=env)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--prelaunch-steps", type=int, default=10)
    parser.add_argument("--tolerance", type=float, default=0.02,
                        help="largest accepted difference of the GPU-trained adapter's test accuracy on GPU and CPU")
    parser.add_argument("--loss-tolerance", type=float, default=0.05,
                        help="largest accepted relative difference of the final training loss, GPU run vs CPU run")
    parser.add_argument("--runs", type=int, nargs="+", default=None,
                        help=f"indices into the run list (0–{len(RUNS) - 1}; default: all)")
    parser.add_argument("--json", type=Path, default=None, help="default: $OUT/gpu_train_check.json when $OUT is set")
    args = parser.parse_args(argv)

    import torch
    from tiny_assets import choice_rows, make_decoder, make_encoder, sentiment_rows, write_jsonl

    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu", file=sys.stderr)
        return 2
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
        [str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    cpu_env = {**env, "CUDA_VISIBLE_DEVICES": ""}
    train_env = env if args.device == "cuda" else cpu_env
    rows, failures = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        models = {"encoder": make_encoder(root / "encoder", dropout=0.0), "decoder": make_decoder(root / "decoder")}
        tasks = {"cls": write_jsonl(root / "cls.jsonl", sentiment_rows(240)),
                 "mc": write_jsonl(root / "mc.jsonl", choice_rows(240))}
        for i, (model, task, method, extra) in enumerate(RUNS):
            if args.runs is not None and i not in args.runs:
                continue
            row: dict = {"model": model, "task": task, "method": method, "flags": " ".join(extra)}
            for where, run_env in (("gpu", train_env), ("cpu", cpu_env)):
                out = root / f"run{i}-{where}"
                t0 = time.perf_counter()
                proc = cli(["train", "--model", str(models[model]), "--task", f"jsonl:{tasks[task]}", "--method",
                            method, "--r", "4", "--steps", str(args.steps), "--prelaunch-steps",
                            str(args.prelaunch_steps), "--batch-size", "8", "--lr", "1e-2", "--max-length", "32",
                            "--output-dir", str(out), "--no-progress", *extra], run_env)
                row[f"{where}_train_s"] = round(time.perf_counter() - t0, 1)
                if proc.returncode != 0:
                    row[f"{where}_error"] = proc.stderr[-1500:]
                    failures.append(f"run {i} ({model} {method} {extra}) on {where}: train exited {proc.returncode}")
                    break
                summary = json.loads((out / "summary.json").read_text())
                losses = [e["loss"] for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                          if e.get("event") == "step"]
                row[f"{where}_switch_step"] = summary["switch_step"]
                row[f"{where}_final_loss"] = sum(losses[-5:]) / 5
                row[f"{where}_test_accuracy"] = summary["metrics_after"]["test"]["accuracy"]
                row["before_test_accuracy"] = summary["metrics_before"]["test"]["accuracy"]
                if where == "gpu":
                    row["gpu_peak_memory_mb"] = summary.get("peak_memory_mb")
                    ev = cli(["eval", str(out), "--output", str(root / f"eval{i}.json")], cpu_env)
                    if ev.returncode != 0:
                        failures.append(f"run {i} ({model} {method}): CPU eval of the GPU run exited "
                                        f"{ev.returncode}: {ev.stderr[-800:]}")
                    else:
                        row["gpu_adapter_cpu_eval"] = json.loads((root / f"eval{i}.json").read_text())["accuracy"]
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if not k.endswith("_error")}), flush=True)
            if "cpu_final_loss" not in row:
                continue
            want_switch = None if method == "lora" else args.prelaunch_steps
            for where in ("gpu", "cpu"):
                if row[f"{where}_switch_step"] != want_switch:
                    failures.append(f"run {i} ({model} {method}) on {where}: switch at {row[f'{where}_switch_step']}, "
                                    f"want {want_switch}")
            gap = abs(row["gpu_final_loss"] - row["cpu_final_loss"])
            if gap > args.loss_tolerance * max(1.0, abs(row["cpu_final_loss"])):
                failures.append(f"run {i} ({model} {method} {extra}): final loss {row['gpu_final_loss']:.4f} on the "
                                f"GPU vs {row['cpu_final_loss']:.4f} on the CPU")
            if "gpu_adapter_cpu_eval" in row and abs(row["gpu_adapter_cpu_eval"] - row["gpu_test_accuracy"]) > \
                    args.tolerance:
                failures.append(f"run {i} ({model} {method}): the GPU-trained adapter scores "
                                f"{row['gpu_adapter_cpu_eval']} on the CPU vs {row['gpu_test_accuracy']} on the GPU")
    info = {"device": args.device, "torch": torch.__version__,
            "card": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"}
    result = {"info": info, "rows": rows, "failures": failures}
    out_json = args.json or (Path(os.environ["OUT"]) / "gpu_train_check.json" if os.environ.get("OUT") else None)
    if out_json is not None:
        out_json.write_text(json.dumps(result, indent=1) + "\n")
    print("\n| model | method | flags | switch (GPU / CPU) | final loss GPU / CPU | test acc. untrained | GPU run | "
          "GPU adapter on CPU | CPU run | train s GPU / CPU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        g = partial(_cell, r)
        print(f"| {r['model']} | {r['method']} | {r['flags']} | {g('gpu_switch_step')} / {g('cpu_switch_step')} | "
              f"{g('gpu_final_loss', '.4f')} / {g('cpu_final_loss', '.4f')} | {g('before_test_accuracy', '.3f')} | "
              f"{g('gpu_test_accuracy', '.3f')} | {g('gpu_adapter_cpu_eval', '.3f')} | {g('cpu_test_accuracy', '.3f')} "
              f"| {g('gpu_train_s')} / {g('cpu_train_s')} |")
    for f in failures:
        print("FAILED:", f)
    print("all checks passed" if not failures else f"{len(failures)} checks failed")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
