"""The bench's building blocks: memory accounting, the pre-launch snapshot, the candidate forwards, and that the
GPU bench's modules import where only torch and the core are installed. No timing is asserted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lora_tsd.app.bench.cli import main as bench_main
from lora_tsd.app.bench.forward_impls import IMPLS, with_impl
from lora_tsd.app.bench.measure import MiB, rss_peak_extra, static_bytes, tensor_bytes, torch_peak_extra
from lora_tsd.app.bench.workloads import OneLayer, PrelaunchSnapshot, attach_adapters
from lora_tsd.inject import adapted_layers
from lora_tsd.switching import switch

ROOT = Path(__file__).resolve().parents[2]


def test_tensor_bytes_counts_a_shared_storage_once() -> None:
    a = torch.zeros(100)  # 400 bytes
    b = torch.zeros(10, dtype=torch.float64)  # 80 bytes
    assert tensor_bytes([a, a[:10], a.view(10, 10), b, None]) == 480  # type: ignore[list-item]


def test_static_bytes_adds_parameters_buffers_optimizer_state_and_inputs() -> None:
    model = nn.Linear(8, 4)  # 32 + 4 floats
    model.register_buffer("extra", torch.zeros(5))
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(3, 8)
    assert static_bytes(model, opt, [x]) == 4 * (36 + 5 + 24)
    model(x).sum().backward()
    opt.step()  # AdamW state: step, exp_avg, exp_avg_sq per parameter
    state = sum(4 * (2 * p.numel() + 1) for p in model.parameters())
    grads = 4 * 36
    assert static_bytes(model, opt, [{"input": x, "note": "ignored"}]) == 4 * (36 + 5 + 24) + grads + state


def test_torch_peak_extra_sees_a_temporary_tensor() -> None:
    n = 2 * MiB // 4
    assert torch_peak_extra(lambda: torch.ones(n).sum()) >= 2 * MiB


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_rss_peak_extra_sees_a_touched_allocation() -> None:
    extra = rss_peak_extra(lambda: torch.ones(16 * MiB // 4).sum())
    if extra is None:
        pytest.skip("no glibc mallopt here")
    assert extra >= 8 * MiB


def _dash_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 10))
    return attach_adapters(model, "dash", ["0", "2"], r=2, s=2, gen=torch.Generator().manual_seed(1), dash_phase=None)


def test_prelaunch_snapshot_makes_the_model_switch_again_from_the_same_state() -> None:
    model = _dash_model()
    x = torch.randn(5, 12)
    before = model(x).detach()
    prelaunch = PrelaunchSnapshot(model)
    switch(model)
    first = [layer.dash_idx.clone() for _, layer in adapted_layers(model)]
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            layer.dash_c.fill_(0.5)  # the dash term now changes the output
    assert not torch.equal(model(x), before)

    prelaunch.restore()
    for _, layer in adapted_layers(model):
        assert not layer.is_switched
        assert not layer._switched  # the forward-time mirror follows the buffer
        assert torch.equal(layer.dash_idx, torch.full_like(layer.dash_idx, -1))
    assert torch.equal(model(x), before)
    switch(model)  # refused if any layer still looked switched
    assert all(torch.equal(a, layer.dash_idx) for a, (_, layer) in zip(first, adapted_layers(model), strict=True))


def test_prelaunch_snapshot_refuses_switched_or_init_adapters() -> None:
    model = _dash_model()
    switch(model)
    with pytest.raises(ValueError, match="pre-launch snapshot"):
        PrelaunchSnapshot(model)
    init = attach_adapters(OneLayer(8, 8), "init", ["proj"], r=2, s=2, gen=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="LoRA-Init"):
        PrelaunchSnapshot(init)


@pytest.mark.parametrize("method", ["lora", "dash"])
def test_candidate_forwards_compute_the_current_forward(method: str) -> None:
    x = torch.randn(2, 6, 16)
    outputs = {}
    for impl in IMPLS:
        torch.manual_seed(0)
        model = with_impl(attach_adapters(OneLayer(12, 16), method, ["proj"], 4, 2, torch.Generator().manual_seed(1)),
                          impl)
        assert type(model.proj).__name__ == IMPLS[impl].__name__
        with torch.no_grad():
            outputs[impl] = model(x)
    for impl, y in outputs.items():
        torch.testing.assert_close(y, outputs["current"], msg=impl)


def test_a_leading_double_dash_reaches_the_bench_options(capsys: pytest.CaptureFixture[str]) -> None:
    """``lora-tsd bench -- --reps 0`` hands ``["--", "--reps", "0"]`` over: the options are read, not rejected."""
    assert bench_main(["--", "--reps", "0"]) == 2
    assert "--reps, --tokens, --rank and --dash must be ≥ 1" in capsys.readouterr().err


BLOCK_APPLICATION_DEPENDENCIES = """
import importlib.abc, sys
BLOCKED = {"transformers", "peft", "accelerate", "matplotlib", "yaml", "tqdm", "datasets", "diffusers"}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked")
        return None
sys.meta_path.insert(0, Block())
"""


def test_the_gpu_bench_needs_only_torch_and_the_core() -> None:
    """The GPU machine has torch (and maybe transformers, peft): the script and its modules import without the
    application's other dependencies and without the rest of the application."""
    code = BLOCK_APPLICATION_DEPENDENCIES + f"""
import runpy
sys.argv = ["gpu_bench.py", "--help"]
try:
    runpy.run_path({str(ROOT / "bench" / "gpu_bench.py")!r}, run_name="__main__")
except SystemExit as exit:
    assert exit.code == 0, exit.code
import lora_tsd.app.bench.gpu_steps, lora_tsd.app.bench.gpu_svd
others = [m for m in sys.modules if m.startswith("lora_tsd.app.") and not m.startswith("lora_tsd.app.bench")]
assert not others, others
print("gpu bench imports ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage: gpu_bench.py" in proc.stdout and "gpu bench imports ok" in proc.stdout
