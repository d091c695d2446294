"""Every method on a tiny Llama (nn.Linear) and a tiny GPT-2 (Conv1D): the invariants of design.md."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import METHODS, MODEL_FACTORIES, TARGETS, logits, make_optimizer, tiny_llama, token_batch, train_step

import lora_tsd
from lora_tsd.layer import PHASE_PRELAUNCH, PHASE_SWITCHED

T = 3  # pre-launch optimizer steps
R, S = 4, 3


def config_for(method: str, kind: str, **overrides) -> lora_tsd.TSDConfig:
    base = dict(method=method, r=R, dash_directions=S, target_modules=TARGETS[kind], seed=0)
    if method in ("dash", "init", "tsd"):
        base["prelaunch_steps"] = T
    base.update(overrides)
    return lora_tsd.TSDConfig(**base)


def base_weights(model, kind: str) -> dict[str, torch.Tensor]:
    """(out, in) copies of the base weight of every layer an adapter would wrap, keyed by layer name."""
    probe = lora_tsd.attach(copy.deepcopy(model), config_for("lora", kind))
    return {name: layer.weight_view().detach().clone() for name, layer in lora_tsd.adapted_layers(probe)}


def non_adapter_state(model) -> dict[str, torch.Tensor]:
    """Every parameter that is not an adapter tensor (base weights, embeddings, norms)."""
    return {k: v.detach().clone() for k, v in model.named_parameters() if not v.requires_grad}


@pytest.mark.parametrize("method", METHODS)
def test_attach_leaves_outputs_unchanged(model_kind, method):
    model = MODEL_FACTORIES[model_kind]()
    ids = token_batch(0)
    before = logits(model, ids)
    lora_tsd.attach(model, config_for(method, model_kind))
    assert (logits(model, ids) - before).abs().max() <= 1e-5


@pytest.mark.parametrize("method", METHODS)
def test_trainable_parameter_count(model_kind, method):
    model = MODEL_FACTORIES[model_kind]()
    cfg = config_for(method, model_kind)
    lora_tsd.attach(model, cfg)
    layers = lora_tsd.adapted_layers(model)
    s = S if method in ("dash", "tsd") else 0
    expected = sum(R * (layer.out_features + layer.in_features) + s for _, layer in layers)
    assert lora_tsd.trainable_parameters(model) == expected
    trainable = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == ({"lora_A", "lora_B", "dash_c"} if s else {"lora_A", "lora_B"})


@pytest.mark.parametrize("method", ["dash", "init", "tsd"])
def test_switch_after_exactly_t_optimizer_steps_and_directions(model_kind, method):
    """Gradient accumulation 4, eval forwards and a generate call between steps: only optimizer steps count."""
    model = MODEL_FACTORIES[model_kind]()
    ids = token_batch(0)
    pretrained = logits(model, ids)
    originals = base_weights(model, model_kind)
    cfg = config_for(method, model_kind)
    lora_tsd.attach(model, cfg)
    opt = make_optimizer(model)
    layers = lora_tsd.adapted_layers(model)
    frozen_before = non_adapter_state(model)
    for n in range(1, T + 1):
        train_step(model, opt, seed=n, accumulation=4)
        logits(model, ids)  # evaluation forward
        model.generate(ids[:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)
        if n < T:
            assert not lora_tsd.step(model, opt)
            assert all(int(layer.phase) == PHASE_PRELAUNCH for _, layer in layers)
            continue
        # The step that switches: rank independently from the pre-launch update, densely.
        expected = {}
        for name, layer in layers:
            dW = layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()
            U, sig, Vh = torch.linalg.svd(originals[name].double(), full_matrices=False)
            rates = (U.T @ dW.double() @ Vh.T).diagonal().abs() / (sig + 1e-8 * sig[0])
            expected[name] = (torch.argsort(rates, descending=True, stable=True), U, sig, Vh)
        before_switch = logits(model, ids)
        assert lora_tsd.step(model, opt)
    assert all(int(layer.phase) == PHASE_SWITCHED and int(layer.step) == T for _, layer in layers)
    after_switch = logits(model, ids)
    if cfg.spec.has_init:
        # The probe's update is discarded: right after the switch the model is the pretrained one.
        assert (after_switch - pretrained).abs().max() <= 1e-5
    else:
        assert (after_switch - before_switch).abs().max() <= 1e-5  # c = 0: the dash switch changes nothing
    for name, layer in layers:
        ranking, U, sig, Vh = expected[name]
        if cfg.spec.has_dash:
            assert layer.dash_idx.tolist() == ranking[:S].tolist()
            assert torch.allclose(layer.dash_U.abs(), U[:, ranking[:S]].float().abs(), atol=1e-4)
        if cfg.spec.has_init:
            top = ranking[:R]
            assert layer.init_idx.tolist() == top.tolist()
            residual = originals[name].double() - U[:, top] @ torch.diag(sig[top]) @ Vh[top]
            assert (layer.weight_view().double() - residual).abs().max() <= 1e-5
            assert torch.allclose(layer.scaling * layer.lora_B @ layer.lora_A,
                                  (originals[name].double() - residual).float(), atol=1e-5)
    # Only adapter tensors change in training (base weights only at the init switch, checked above).
    train_step(model, opt, seed=99)
    lora_tsd.step(model, opt)
    frozen_after = non_adapter_state(model)
    for key, value in frozen_before.items():
        if cfg.spec.has_init and key.endswith("base_layer.weight"):
            continue
        assert torch.equal(value, frozen_after[key]), key
    if cfg.spec.has_dash:
        assert any(layer.dash_c.abs().sum() > 0 for _, layer in layers)  # c trains after the switch


def test_tsd_switch_resets_optimizer_state_of_A_B_and_c(model_kind):
    model = MODEL_FACTORIES[model_kind]()
    lora_tsd.attach(model, config_for("tsd", model_kind))
    opt = make_optimizer(model)
    for n in range(T):
        train_step(model, opt, seed=n)
        if n < T - 1:
            for _, layer in lora_tsd.adapted_layers(model):
                assert int(opt.state[layer.dash_c]["step"]) == n + 1  # c is in the optimizer from step 0
        lora_tsd.step(model, opt)
    for _, layer in lora_tsd.adapted_layers(model):
        assert layer.lora_A not in opt.state and layer.lora_B not in opt.state
        assert layer.dash_c not in opt.state  # its Adam step count restarts at the switch (method.md §3)


def test_dash_coefficient_is_in_optimizer_from_step_zero_and_stays_zero_before_switch(model_kind):
    model = MODEL_FACTORIES[model_kind]()
    lora_tsd.attach(model, config_for("dash", model_kind))
    opt = make_optimizer(model)
    train_step(model, opt, seed=1)
    lora_tsd.step(model, opt)
    for _, layer in lora_tsd.adapted_layers(model):
        assert layer.dash_c in opt.state
        assert torch.count_nonzero(layer.dash_c) == 0


@pytest.mark.parametrize("method, selector", [("pissa", "top"), ("milora", "bottom")])
def test_pissa_and_milora_initialize_at_attach(model_kind, method, selector):
    model = MODEL_FACTORIES[model_kind]()
    originals = base_weights(model, model_kind)
    lora_tsd.attach(model, config_for(method, model_kind))
    for name, layer in lora_tsd.adapted_layers(model):
        assert int(layer.phase) == PHASE_SWITCHED and int(layer.step) == 0
        k = min(layer.out_features, layer.in_features)
        expected = list(range(R)) if selector == "top" else list(range(k - 1, k - 1 - R, -1))
        assert layer.init_idx.tolist() == expected
        U, sig, Vh = torch.linalg.svd(originals[name], full_matrices=False)
        idx = torch.tensor(expected)
        removed = originals[name] - layer.weight_view()
        assert torch.allclose(removed, U[:, idx] @ torch.diag(sig[idx]) @ Vh[idx], atol=1e-5)


def test_tsd_next_placement_puts_dash_after_the_init_directions(model_kind):
    model = MODEL_FACTORIES[model_kind]()
    lora_tsd.attach(model, config_for("tsd", model_kind, dash_placement="next"))
    opt = make_optimizer(model)
    for n in range(T):
        train_step(model, opt, seed=n)
        lora_tsd.step(model, opt)
    for _, layer in lora_tsd.adapted_layers(model):
        assert not set(layer.init_idx.tolist()) & set(layer.dash_idx.tolist())


def test_random_selector_is_seeded(model_kind):
    picks = []
    for _ in range(2):
        model = MODEL_FACTORIES[model_kind]()
        lora_tsd.attach(model, config_for("dash", model_kind, selector="random", prelaunch_steps=0, seed=5))
        picks.append([layer.dash_idx.tolist() for _, layer in lora_tsd.adapted_layers(model)])
    assert picks[0] == picks[1]
    assert len({tuple(p) for p in picks[0]}) > 1  # layers differ from each other


def test_gradient_probe_ranks_by_the_full_weight_gradient():
    kind = "llama"
    reference = MODEL_FACTORIES[kind]()
    batches = [token_batch(s) for s in range(2)]
    for ids in batches:  # reference full-weight gradient with plain autograd
        reference(ids, labels=ids).loss.backward()
    model = MODEL_FACTORIES[kind]()
    ids0 = token_batch(0)
    pretrained = logits(model, ids0)
    lora_tsd.attach(model, config_for("init", kind, init_estimator="gradient", prelaunch_steps=0))
    grads = lora_tsd.gradient_probe(model, batches, lambda m, ids: m(ids, labels=ids).loss)
    for name, layer in lora_tsd.adapted_layers(model):
        G_ref = reference.get_submodule(name).weight.grad
        assert torch.allclose(grads[name], G_ref, atol=1e-5, rtol=1e-4)
        rates = lora_tsd.change_rates(reference.get_submodule(name).weight, G_ref)
        assert layer.init_idx.tolist() == lora_tsd.select_directions(rates, R).tolist()
        assert int(layer.phase) == PHASE_SWITCHED and int(layer.step) == 0
    assert (logits(model, ids0) - pretrained).abs().max() <= 1e-5
    assert all(p.grad is None for p in model.parameters())  # the probe leaves no gradients behind


@pytest.mark.parametrize("method", ["init", "tsd"])
@pytest.mark.parametrize("group_size", [1, 3])
def test_grouped_gradient_probe_selects_exactly_the_full_probes_directions(method, group_size):
    """The low-memory probe (one group of layers at a time, batches replayed per group) selects the same
    indices as the all-layers probe, leaves the same buffers and base weights, and keeps the outputs."""
    kind = "llama"
    batches = [token_batch(s) for s in range(3)]
    states = []
    for size in (None, group_size):
        model = MODEL_FACTORIES[kind]()
        lora_tsd.attach(model, config_for(method, kind, init_estimator="gradient", prelaunch_steps=0,
                                          dropout=0.3))  # replays must draw the same masks
        model.train()
        torch.manual_seed(7)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        out = lora_tsd.gradient_probe(model, iter(batches), lambda m, ids: m(ids, labels=ids).loss, opt,
                                      group_size=size)
        assert (out == {}) == (size is not None)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        states[-1]["rng_after"] = torch.random.get_rng_state()  # the generator ends where one pass leaves it
        assert all(p.grad is None for p in model.parameters())
    full, grouped = states
    assert full.keys() == grouped.keys()
    idx_keys = [k for k in full if k.endswith(("init_idx", "dash_idx"))]
    assert len(idx_keys) >= 6
    for k in idx_keys:  # exactly the same directions
        assert torch.equal(full[k], grouped[k]), k
    for k in full:  # the same G; the SVDs' last bits may follow the thread layout (switch's docstring)
        assert torch.allclose(full[k].float(), grouped[k].float(), rtol=0, atol=1e-7), k


def test_grouped_gradient_probe_refuses_a_bad_group_size():
    model = MODEL_FACTORIES["llama"]()
    lora_tsd.attach(model, config_for("init", "llama", init_estimator="gradient", prelaunch_steps=0))
    with pytest.raises(lora_tsd.ConfigError, match=r"group_size must be a positive integer or None, got 0"):
        lora_tsd.gradient_probe(model, [token_batch(0)], lambda m, ids: m(ids, labels=ids).loss, group_size=0)


@pytest.mark.parametrize("workers", [2, 3])
def test_switch_in_parallel_selects_what_the_serial_switch_selects(workers):
    """The CPU switch decomposes several layers at once; it is a drop-in for the serial one: same directions,
    same buffers, and the thread count of the caller is restored."""
    def build() -> torch.nn.Module:
        model = tiny_llama()
        lora_tsd.attach(model, lora_tsd.TSDConfig(method="tsd", r=4, dash_directions=3, prelaunch_steps=1,
                                                  target_modules=TARGETS["llama"]))
        with torch.no_grad():
            for _, layer in lora_tsd.adapted_layers(model):
                layer.lora_B.normal_()
        return model

    a, b = build(), build()
    threads = torch.get_num_threads()
    lora_tsd.switch(a, workers=1)
    lora_tsd.switch(b, workers=workers)
    assert torch.get_num_threads() == threads
    for (_, la), (_, lb) in zip(lora_tsd.adapted_layers(a), lora_tsd.adapted_layers(b), strict=True):
        assert lb.is_switched
        for key in ("dash_idx", "init_idx"):
            assert torch.equal(getattr(la, key), getattr(lb, key)), key
        for key in ("dash_U", "dash_V", "lora_A", "lora_B", "init_B0", "init_A0"):
            assert torch.allclose(getattr(la, key), getattr(lb, key), atol=1e-5), key


@pytest.mark.parametrize("workers", [0, -1, 1.5, True])
def test_switch_rejects_a_bad_worker_count(workers):
    model = lora_tsd.attach(tiny_llama(), lora_tsd.TSDConfig(method="dash", r=4, dash_directions=3,
                                                             prelaunch_steps=1, target_modules=TARGETS["llama"]))
    with pytest.raises(lora_tsd.ConfigError, match="workers must be a positive integer"):
        lora_tsd.switch(model, workers=workers)
