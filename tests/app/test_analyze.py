"""`lora-tsd analyze`: spectra recover constructed TSDs exactly (adapter, run and full-checkpoint sources), the
overlap of two constructed TSD sets is what was built, and TSD capture runs end to end on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_assets import make_encoder, sentiment_rows, write_jsonl

from lora_tsd import TSDConfig, adapted_layers, attach, merge, save_adapter, thin_svd
from lora_tsd.app.assets.models import load_model
from lora_tsd.app.cli import main
from lora_tsd.app.experiments.capture import capture_scores, snapshot_steps
from lora_tsd.app.experiments.spectrum import layer_spectrum

R = 3
# Per layer (by position in module order) the constructed TSDs, most important first. Set B shares 2 of 3.
CHOSEN_A = [[5, 17, 2], [9, 0, 30], [20, 3, 11], [7, 25, 14]]
CHOSEN_B = [[17, 5, 26], [9, 30, 12], [11, 3, 28], [1, 14, 7]]
RATES = [3e-2, 2e-2, 1e-2]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return make_encoder(tmp_path_factory.mktemp("analyze") / "tiny-bert", dropout=0.0)


def _chosen(table, index, k):
    return [i % k for i in table[index % len(table)]]


def constructed_model(encoder, table):
    """A tiny BERT with a LoRA adapter whose ΔW = Σ_j c_j u_{i_j} v_{i_j}ᵀ, rate_j = c_j / σ_{i_j} = RATES[j]."""
    model, _, _ = load_model(encoder, num_labels=2)
    attach(model, TSDConfig(method="lora", r=R, modules_to_save=["classifier"]))
    expected = {}
    with torch.no_grad():
        for index, (name, layer) in enumerate(adapted_layers(model)):
            svd = thin_svd(layer.weight_view())
            chosen = _chosen(table, index, svd.S.numel())
            coeff = torch.tensor(RATES) * svd.S[chosen]
            layer.lora_B.copy_(svd.U[:, chosen] * coeff / layer.scaling)
            layer.lora_A.copy_(svd.Vh[chosen])
            expected[name] = chosen
    return model, expected


def test_layer_spectrum_recovers_constructed_directions():
    torch.manual_seed(0)
    W = torch.randn(24, 40)
    svd = thin_svd(W)
    chosen = [6, 1, 19]
    # Rates whose cumulative shares stay clear of 50 % and 90 %: with RATES the top one is exactly 3/6 = 50 %,
    # and fp32 rounding decides n50 differently from one CPU to another.
    rates = [3e-2, 2e-2, 1.5e-2]
    delta = sum(rate * svd.S[i] * torch.outer(svd.U[:, i], svd.Vh[i]) for rate, i in zip(rates, chosen, strict=True))
    info = layer_spectrum(svd, delta, top=3)
    assert info["top_indices"] == chosen
    assert info["top_rates"] == pytest.approx(rates, rel=1e-4)
    assert info["n50"] == 2 and info["n90"] == 3  # 3/6.5 = 46 %, 5/6.5 = 77 %, 100 %
    assert info["core_energy_share"] == pytest.approx(1.0, rel=1e-6)  # ΔW lies on core directions only
    # the low-rank path gives the same answer as the dense one
    B = torch.stack([rate * svd.S[i] * svd.U[:, i] for rate, i in zip(RATES, chosen, strict=True)], dim=1)
    A = svd.Vh[chosen]
    assert layer_spectrum(svd, (B, A), top=3)["top_indices"] == chosen
    # a change off the core directions (u_i v_jᵀ, i ≠ j) has zero core energy
    off = torch.outer(svd.U[:, 0], svd.Vh[1])
    assert layer_spectrum(svd, off, top=3)["core_energy_share"] == pytest.approx(0.0, abs=1e-9)


def test_precision_check_flags_directions_below_fp32_resolution():
    from lora_tsd.app.experiments.spectrum import float64_svd

    gen = torch.Generator().manual_seed(3)
    U, _ = torch.linalg.qr(torch.randn(64, 48, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(48, 48, generator=gen, dtype=torch.float64))  # full rank: k = 48
    B, A = torch.randn(64, 4, generator=gen), torch.randn(4, 48, generator=gen)
    agreement = {}
    for smallest in (1e-2, 1e-12):  # well-conditioned; then the bottom half of σ below fp32's resolution of W
        S = torch.logspace(0, torch.log10(torch.tensor(smallest)).item(), 48, dtype=torch.float64)
        W = ((U * S) @ V.T).float()
        info = layer_spectrum(thin_svd(W), (B, A), top=8, reference_svd=float64_svd(W))
        agreement[smallest] = info["fp64_top_agreement"]
    assert agreement[1e-2] == 1.0
    assert agreement[1e-12] < 1.0
    assert "fp64_top_agreement" not in layer_spectrum(thin_svd(W), (B, A), top=8)


def test_spectrum_of_adapters_recovers_tsds_and_overlap(tmp_path, encoder):
    model_a, expected_a = constructed_model(encoder, CHOSEN_A)
    model_b, expected_b = constructed_model(encoder, CHOSEN_B)
    save_adapter(model_a, tmp_path / "task_a")
    save_adapter(model_b, tmp_path / "task_b")
    out = tmp_path / "spectrum"
    assert main(["analyze", "spectrum", str(tmp_path / "task_a"), str(tmp_path / "task_b"), "--model", str(encoder),
                 "--top", "3", "--labels", "a", "b", "--out", str(out)]) == 0
    report = json.loads((out / "spectrum.json").read_text())
    for label, expected in (("a", expected_a), ("b", expected_b)):
        layers = report["layers"][label]
        assert set(layers) == set(expected)
        for name, chosen in expected.items():
            assert layers[name]["top_indices"] == chosen, name
            assert layers[name]["top_rates"] == pytest.approx(RATES, rel=1e-3)
            rest = [r for i, r in enumerate(layers[name]["rates"]) if i not in chosen]
            assert max(rest) < 1e-5  # nothing else moved
    per_layer = report["overlap"]["per_layer"]
    for name in expected_a:
        want = len(set(expected_a[name]) & set(expected_b[name])) / 3
        assert per_layer[name] == pytest.approx(want)
    assert report["overlap"]["mean"] == pytest.approx(2 / 3)
    assert report["summary"]["a"]["all"]["mean_n90"] == 3
    for name in ("spectra_a.png", "spectra_sorted_a.png", "spectra_b.png", "tsd_positions.png", "overlap.png"):
        assert (out / name).stat().st_size > 1000, name


def test_spectrum_of_a_full_checkpoint_matches_the_adapter(tmp_path, encoder):
    model, expected = constructed_model(encoder, CHOSEN_A)
    merge(model).save_pretrained(tmp_path / "full")  # a "fully fine-tuned" folder: W + ΔW in every layer
    out = tmp_path / "spectrum"
    assert main(["analyze", "spectrum", str(tmp_path / "full"), "--model", str(encoder), "--top", "3",
                 "--out", str(out), "--no-plots"]) == 0
    layers = json.loads((out / "spectrum.json").read_text())["layers"]["full"]
    assert {n: info["top_indices"] for n, info in layers.items()} == expected


def test_capture_scores_and_snapshot_steps():
    reference = {"l": list(range(16))}
    assert capture_scores({"l": [0, 1, 2, 3, 40, 41, 42, 43]}, reference) == pytest.approx(
        {"recall": 1.0, "accuracy": 0.5, "recall_event": 1.0, "accuracy_at_least_0.75": 0.0, "layers": 1})
    assert capture_scores({"l": [0, 1, 2, 30, 4, 5, 6, 7]}, reference)["recall"] == 0.75
    assert snapshot_steps(40, every=10) == [1, 2, 5, 10, 20, 30, 40]
    assert snapshot_steps(40, explicit=[3, 99, 7]) == [3, 7]


def test_capture_end_to_end_with_a_lora_run(tmp_path, encoder):
    task = write_jsonl(tmp_path / "sentiment.jsonl", sentiment_rows(120))
    run = tmp_path / "run"
    assert main(["train", "--model", str(encoder), "--task", f"jsonl:{task}", "--method", "lora", "--r", "2",
                 "--steps", "6", "--batch-size", "8", "--warmup-steps", "1", "--checkpoint-every", "2",
                 "--output-dir", str(run), "--no-progress", "--eval-batch-size", "32"]) == 0
    out = tmp_path / "capture"
    assert main(["analyze", "capture", "--model", str(encoder), "--task", f"jsonl:{task}", "--steps", "6",
                 "--every", "2", "--r", "2", "--batch-size", "8", "--warmup-steps", "1", "--lr", "1e-2",
                 "--full-lr", "1e-3", "--out", str(out), "--eval-batch-size", "32"]) == 0
    result = json.loads((out / "capture.json").read_text())
    lora = result["series"]["LoRA ΔW = BA"]
    assert lora["steps"] == [2, 4, 5, 6]  # step 1 ran at lr 0 (warm-up): ΔW = 0, no ranking
    assert all(0.0 <= v <= 1.0 for v in lora["accuracy"] + lora["recall"])
    full = result["series"]["full fine-tune ΔW (at step t)"]
    assert full["accuracy"][-1] == 1.0 and full["recall"][-1] == 1.0  # the reference against itself
    assert (out / "capture.png").stat().st_size > 1000
    assert (out / "full_ft" / "config.json").is_file()
    # the same reference, LoRA snapshots read from the run's checkpoints (the newest two) and final adapter
    out2 = tmp_path / "capture_run"
    assert main(["analyze", "capture", "--lora-run", str(run), "--reference", str(out / "full_ft"),
                 "--model", str(encoder), "--out", str(out2), "--no-plots"]) == 0
    result2 = json.loads((out2 / "capture.json").read_text())
    assert result2["series"]["LoRA ΔW = BA"]["steps"] == [4, 6]
    assert "full fine-tune ΔW (at step t)" not in result2["series"]


def test_spectrum_reports_the_dash_share_of_a_switched_dash_adapter(tmp_path, encoder):
    from lora_tsd import switching as schedule

    model, _, _ = load_model(encoder, num_labels=2)
    attach(model, TSDConfig(method="dash", r=R, dash_directions=2, prelaunch_steps=1,
                            modules_to_save=["classifier"]))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.1)
    schedule.switch(model)
    expected = {}
    with torch.no_grad():
        for name, layer in adapted_layers(model):
            layer.dash_c.copy_(torch.randn(2, generator=gen) * 0.01)
            dense = layer.scaling * (layer.lora_B @ layer.lora_A)  # the reference forms the full matrix
            expected[name] = float(layer.dash_c.norm() / dense.norm())
    save_adapter(model, tmp_path / "dash")
    out = tmp_path / "spectrum"
    assert main(["analyze", "spectrum", str(tmp_path / "dash"), "--model", str(encoder), "--top", "2",
                 "--out", str(out), "--no-plots"]) == 0
    report = json.loads((out / "spectrum.json").read_text())
    layers = report["layers"]["dash"]
    for name, share in expected.items():
        assert layers[name]["dash_share"] == pytest.approx(share, rel=1e-5), name
    values = sorted(expected.values())
    assert report["summary"]["dash"]["all"]["median_dash_share"] == pytest.approx(values[len(values) // 2], rel=1e-5)
    assert report["summary"]["dash"]["all"]["max_dash_share"] == pytest.approx(values[-1], rel=1e-5)


def test_spectrum_reports_where_lora_init_starts(tmp_path, encoder):
    """init_start_ratio = ‖A₀‖_F / ‖A of a fresh LoRA attach‖_F, with ‖A₀‖_F² = Σσ_T / (α/r) from a dense SVD."""
    from lora_tsd import switching as schedule

    model, _, _ = load_model(encoder, num_labels=2)
    originals = {name: layer.weight_view().detach().clone() for name, layer in
                 adapted_layers(attach(load_model(encoder, num_labels=2)[0], TSDConfig(method="lora", r=R)))}
    attach(model, TSDConfig(method="init", r=R, prelaunch_steps=1, seed=4, modules_to_save=["classifier"]))
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for _, layer in adapted_layers(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.1)
    schedule.switch(model)
    fresh, _, _ = load_model(encoder, num_labels=2)
    lora_a = {name: layer.lora_A.detach().clone() for name, layer in
              adapted_layers(attach(fresh, TSDConfig(method="lora", r=R, seed=4)))}
    expected = {}
    for name, layer in adapted_layers(model):
        sigma = torch.linalg.svdvals(originals[name].double())
        chosen = sigma[layer.init_idx]
        expected[name] = float(torch.sqrt(chosen.sum() / layer.scaling) / lora_a[name].double().norm())
    save_adapter(model, tmp_path / "init")
    out = tmp_path / "spectrum"
    assert main(["analyze", "spectrum", str(tmp_path / "init"), "--model", str(encoder), "--top", "2",
                 "--out", str(out), "--no-plots"]) == 0
    report = json.loads((out / "spectrum.json").read_text())
    for name, ratio in expected.items():
        assert report["layers"]["init"][name]["init_start_ratio"] == pytest.approx(ratio, rel=1e-4), name
        assert "dash_share" not in report["layers"]["init"][name]  # LoRA-Init has no dash term
    values = sorted(expected.values())
    summary = report["summary"]["init"]["all"]
    assert summary["median_init_start_ratio"] == pytest.approx(values[len(values) // 2], rel=1e-4)
    assert (summary["min_init_start_ratio"], summary["max_init_start_ratio"]) == pytest.approx(
        (values[0], values[-1]), rel=1e-4)
