"""Distributed runs on CPU with gloo: the switch's SVDs split across ranks give every rank the same directions,
and a 2-process DDP or FSDP2 training run equals the 1-process run with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import fault_injection
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from tiny_assets import make_encoder, sentiment_rows, write_jsonl

pytestmark = pytest.mark.distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _switch_worker(rank: int, world: int, port: int, out: str) -> None:
    from conftest import TARGETS, make_optimizer, tiny_llama, train_step

    import lora_tsd

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = lora_tsd.attach(tiny_llama(), lora_tsd.TSDConfig(method="tsd", r=4, dash_directions=3,
                                                                 prelaunch_steps=2, target_modules=TARGETS["llama"]))
        opt = make_optimizer(model)
        for n in range(2):
            train_step(model, opt, seed=n)  # the same data on every rank: adapters stay identical
            lora_tsd.step(model, opt)
        state = {f"{name}.{key}": getattr(layer, key).detach().clone()
                 for name, layer in lora_tsd.adapted_layers(model)
                 for key in ("dash_idx", "init_idx", "dash_U", "lora_A", "lora_B")}
        save_file(state, f"{out}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def test_switch_split_across_ranks_selects_identical_directions(tmp_path):
    mp.spawn(_switch_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    _switch_worker_single(tmp_path)
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    single = load_file(str(tmp_path / "single.safetensors"))
    assert ranks[0].keys() == ranks[1].keys() == single.keys()
    for key in single:
        assert torch.equal(ranks[0][key], ranks[1][key]), key
        assert torch.allclose(ranks[0][key].float(), single[key].float(), atol=1e-6), key


def _switch_worker_single(tmp_path) -> None:
    from conftest import TARGETS, make_optimizer, tiny_llama, train_step

    import lora_tsd

    model = lora_tsd.attach(tiny_llama(), lora_tsd.TSDConfig(method="tsd", r=4, dash_directions=3,
                                                             prelaunch_steps=2, target_modules=TARGETS["llama"]))
    opt = make_optimizer(model)
    for n in range(2):
        train_step(model, opt, seed=n)
        lora_tsd.step(model, opt)
    state = {f"{name}.{key}": getattr(layer, key).detach().clone() for name, layer in lora_tsd.adapted_layers(model)
             for key in ("dash_idx", "init_idx", "dash_U", "lora_A", "lora_B")}
    save_file(state, str(tmp_path / "single.safetensors"))


@pytest.mark.parametrize("launcher", ["torchrun", "accelerate", "torchrun-fsdp2", "torchrun-gradient"])
def test_ddp_training_matches_single_process(tmp_path, launcher):
    model = make_encoder(tmp_path / "enc", dropout=0.0)  # no RNG in the forward: runs must agree exactly
    task = write_jsonl(tmp_path / "s.jsonl", sentiment_rows(100))
    # -gradient: the default estimator, probed on each rank's share of the probe batches, summed over ranks
    estimator = ["--probe-batches", "4"] if launcher.endswith("gradient") else ["--prelaunch-steps", "3"]
    args = ["train", "--model", str(model), "--task", f"jsonl:{task}", "--no-progress", "--method", "tsd",
            "--rank", "4", "--dash-directions", "2", *estimator, "--steps", "6", "--batch-size", "8",
            "--lr", "1e-2", "--dropout", "0"]
    if launcher.endswith("fsdp2"):  # an FSDP2-sharded run exports its last step (no best checkpoint): compare those
        args.append("--no-best-checkpoint")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "lora_tsd.app.cli", *args, "--output-dir", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    if launcher.startswith("torchrun"):
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                  "--master_port", str(_free_port()), "-m", "lora_tsd.app.cli"]
    else:  # accelerate's multi-process launcher; without a GPU it runs gloo CPU processes
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", str(_free_port()), "-m", "lora_tsd.app.cli"]
    extra = ["--fsdp"] if launcher.endswith("fsdp2") else []
    multi = subprocess.run([*launch, *args, *extra, "--output-dir", str(tmp_path / "two")], capture_output=True,
                           text=True, env=env, timeout=600)
    assert multi.returncode == 0, multi.stderr[-3000:]
    a = load_file(str(tmp_path / "one" / "adapter" / "tsd_adapter.safetensors"))
    b = load_file(str(tmp_path / "two" / "adapter" / "tsd_adapter.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith(("_idx", "phase", "step", "base_fingerprint")):
            assert torch.equal(a[key], b[key]), key
        else:
            assert (a[key].double() - b[key].double()).abs().max() <= 1e-6, key
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["processes"] == 2
    assert summary["switch_step"] == (0 if launcher.endswith("gradient") else 3)


@pytest.mark.parametrize("every, kill, resumes_from", [(2, 6, 4), (1, 4, 3)])
def test_fsdp2_kill_and_resume_is_bit_identical(tmp_path, every, kill, resumes_from):
    """FSDP2 checkpoints gather the sharded adapter and optimizer state and every rank's RNG state: a 2-process
    run killed after its switch and resumed with --resume ends bit-identical to one that was never killed; also
    from the switch step's own checkpoint, where A and B have no optimizer state yet."""
    model = make_encoder(tmp_path / "enc", dropout=0.1)  # dropout: each rank's own RNG stream must be restored
    task = write_jsonl(tmp_path / "s.jsonl", sentiment_rows(100))
    args = ["train", "--model", str(model), "--task", f"jsonl:{task}", "--no-progress", "--method", "tsd",
            "--rank", "4", "--dash-directions", "2", "--prelaunch-steps", "3", "--steps", "7", "--batch-size", "8",
            "--lr", "1e-2", "--dropout", "0.1", "--fsdp", "--checkpoint-every", str(every)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def launch(out: str, *extra: str, fault: str | None = None) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), fault_injection.SCRIPT, fault or "-", *args, "--output-dir", str(tmp_path / out),
               *extra]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)

    reference = launch("reference")
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed = launch("killed", fault=f"step:{kill}")  # the switch is at step 3
    assert killed.returncode != 0
    assert not (tmp_path / "killed" / "summary.json").exists()
    assert (tmp_path / "killed" / "checkpoints" / f"step-{resumes_from:07d}").is_dir()
    resumed = launch("killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"from step-{resumes_from:07d}" in resumed.stdout
    a = load_file(str(tmp_path / "reference" / "adapter" / "tsd_adapter.safetensors"))
    b = load_file(str(tmp_path / "killed" / "adapter" / "tsd_adapter.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
