"""Bad input gets a specific error, never a silent fallback."""

from __future__ import annotations

import pytest
import torch
from conftest import MODEL_FACTORIES, TARGETS, make_optimizer, token_batch, train_step

import lora_tsd


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="qlora"), "unknown method 'qlora'; choose one of lora, dash, init, tsd, pissa, milora"),
        (dict(r=0), "r must be a positive integer"),
        (dict(r=-2), "r must be a positive integer"),
        (dict(method="dash", prelaunch_steps=-1), r"prelaunch_steps \(t\) must be an integer ≥ 0"),
        (dict(method="dash", selector="largest"), "unknown selector 'largest'"),
        (dict(method="dash", dash_directions=0), "needs dash_directions ≥ 1"),
        (dict(method="dash", dash_directions=-3), r"dash_directions \(s\) must be an integer ≥ 0"),
        (dict(method="init", init_estimator="prelaunch", prelaunch_steps=0), "prelaunch_steps must be ≥ 1"),
        (dict(method="init", init_estimator="gradient", prelaunch_steps=5), "prelaunch_steps=5 would never run"),
        (dict(method="tsd", init_estimator="gradient", selector="top"), "selector 'top' ranks by σ"),
        (dict(method="pissa", init_estimator="gradient"), "selector 'top' ranks by σ"),
        (dict(method="init", r=4, init_directions=5), r"init_directions must be an integer in \[1, r=4\]"),
        (dict(method="lora", init_estimator="gradient"), "applies to init-style methods"),
        (dict(method="tsd", dash_placement="middle"), "unknown dash_placement 'middle'"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(target_modules="q_proj("), "regex 'q_proj\\(' is invalid"),
        (dict(target_modules=[]), "non-empty list"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(lora_tsd.ConfigError, match=message):
        lora_tsd.TSDConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, estimator, t",
    [
        (dict(method="init"), "gradient", 0),  # the default since 0.2 (docs/results.md)
        (dict(method="tsd"), "gradient", 0),
        (dict(method="tsd", prelaunch_steps=0), "gradient", 0),
        (dict(method="init", prelaunch_steps=20), "prelaunch", 20),  # a pre-launch asked for: the paper's estimator
        (dict(method="init", init_estimator="prelaunch"), "prelaunch", 100),
        (dict(method="init", selector="random"), "prelaunch", 0),  # no ranking, so no estimator: switch at attach
        (dict(method="pissa"), "prelaunch", 0),
        (dict(method="dash"), "prelaunch", 100),
        (dict(method="lora"), "prelaunch", 0),
    ],
)
def test_estimator_and_prelaunch_defaults(kwargs, estimator, t):
    config = lora_tsd.TSDConfig(**kwargs)
    assert (config.init_estimator, config.prelaunch_steps) == (estimator, t)
    assert lora_tsd.TSDConfig.from_dict(config.to_dict()) == config  # the resolved values round-trip


def test_unknown_config_key():
    with pytest.raises(lora_tsd.ConfigError, match="unknown config key.*rank"):
        lora_tsd.TSDConfig.from_dict({"method": "dash", "rank": 8})


def test_no_target_matches_lists_the_adaptable_names():
    model = MODEL_FACTORIES["llama"]()
    with pytest.raises(lora_tsd.TargetError) as err:
        lora_tsd.attach(model, lora_tsd.TSDConfig(target_modules=["query"]))
    message = str(err.value)
    assert "no module matches target_modules=['query']" in message
    for name in ("q_proj ×2", "k_proj ×2", "down_proj ×2", "lm_head ×1"):
        assert name in message


def test_target_that_is_not_linear():
    with pytest.raises(lora_tsd.TargetError, match="not nn.Linear/Conv1D .*LlamaMLP"):
        lora_tsd.attach(MODEL_FACTORIES["llama"](), lora_tsd.TSDConfig(target_modules=["mlp"]))


def test_r_larger_than_layer():
    # k_proj of the tiny llama is 32×64: k = 32
    message = r"r=40 exceeds min\(out, in\)=32 of layer 'model.layers.0.self_attn.k_proj'"
    with pytest.raises(lora_tsd.ConfigError, match=message):
        lora_tsd.attach(MODEL_FACTORIES["llama"](), lora_tsd.TSDConfig(r=40, target_modules=["k_proj"]))


def test_s_larger_than_directions():
    cfg = lora_tsd.TSDConfig(method="dash", r=4, dash_directions=33, target_modules=["k_proj"])
    with pytest.raises(lora_tsd.ConfigError, match="has 32 directions, fewer than the 33"):
        lora_tsd.attach(MODEL_FACTORIES["llama"](), cfg)


def test_attach_twice():
    model = lora_tsd.attach(MODEL_FACTORIES["llama"](), lora_tsd.TSDConfig(target_modules=["q_proj"]))
    with pytest.raises(lora_tsd.ConfigError, match="already has TSD adapters"):
        lora_tsd.attach(model, lora_tsd.TSDConfig(target_modules=["q_proj"]))


def test_step_without_adapters():
    model = MODEL_FACTORIES["llama"]()
    with pytest.raises(lora_tsd.ConfigError, match="lora_tsd.step needs a model with TSD adapters"):
        lora_tsd.step(model, make_optimizer(model))


def _dash_model():
    model = MODEL_FACTORIES["llama"]()
    lora_tsd.attach(model, lora_tsd.TSDConfig(method="tsd", r=4, dash_directions=2, prelaunch_steps=1,
                                             target_modules=TARGETS["llama"]))
    return model


def test_non_finite_base_weight_at_switch_names_the_layer():
    model = _dash_model()
    opt = make_optimizer(model)
    train_step(model, opt, seed=0)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 3] = float("nan")
    with pytest.raises(lora_tsd.NonFiniteError, match="layer 'model.layers.1.mlp.up_proj': base weight contains NaN"):
        lora_tsd.step(model, opt)


def test_non_finite_adapter_at_switch_names_the_layer():
    model = _dash_model()
    opt = make_optimizer(model)
    train_step(model, opt, seed=0)
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.lora_B[0, 0] = float("inf")
    message = "layer 'model.layers.0.self_attn.v_proj': lora_B contains NaN or inf"
    with pytest.raises(lora_tsd.NonFiniteError, match=message):
        lora_tsd.step(model, opt)


def test_init_switch_without_optimizer():
    model = _dash_model()
    train_step(model, make_optimizer(model), seed=0)
    with pytest.raises(lora_tsd.ConfigError, match="pass the optimizer"):
        lora_tsd.step(model)


def test_gradient_estimator_without_probe():
    model = MODEL_FACTORIES["llama"]()
    lora_tsd.attach(model, lora_tsd.TSDConfig(method="init", init_estimator="gradient", r=4,
                                             target_modules=TARGETS["llama"]))
    opt = make_optimizer(model)
    train_step(model, opt, seed=0)
    with pytest.raises(lora_tsd.ConfigError, match=r"call lora_tsd.gradient_probe"):
        lora_tsd.step(model, opt)


def test_change_rates_on_non_finite_weight():
    with pytest.raises(lora_tsd.NonFiniteError):
        lora_tsd.change_rates(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), torch.eye(2))


def test_token_batch_helper_is_deterministic():  # guards the fixtures every other test relies on
    assert torch.equal(token_batch(3), token_batch(3)) and not torch.equal(token_batch(3), token_batch(4))
