"""DreamBooth training on a tiny random Stable Diffusion pipeline: attach on a UNet, the loss, prior preservation,
export as a diffusers LoRA that stock ``load_lora_weights`` loads (every method), the merged pipeline, resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_diffusion import make_images, make_pipeline, make_sdxl_pipeline

from lora_tsd import TSDConfig, attach, load_adapter
from lora_tsd.adapter_io import TENSORS_FILE
from lora_tsd.app.diffusion.config import UNET_ATTENTION_TARGETS, DreamBoothConfig
from lora_tsd.app.diffusion.export import LORA_WEIGHTS_FILE, export_diffusers
from lora_tsd.app.diffusion.pipeline import load_pipeline
from lora_tsd.app.diffusion.training import noise_prediction_loss, prepare_data, run_dreambooth, step_loss

R, S = 2, 2
EXPORTED_RANK = {"lora": R, "dash": R + S, "init": 2 * R, "pissa": 2 * R, "milora": 2 * R, "tsd": 2 * R + S}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("diffusion")
    return {"pipeline": make_pipeline(root), "images": make_images(root / "images"),
            "class_images": make_images(root / "class_images", seed=1)}


def config(assets: dict[str, Path], out: Path, **changes) -> DreamBoothConfig:
    values = dict(model=str(assets["pipeline"]), images=str(assets["images"]), prompt="a photo of sks dog",
                  resolution=32, steps=4, r=R, dash_directions=S, prelaunch_steps=2, lr=1e-2, samples=0,
                  sample_steps=2, probe_batches=2, output_dir=str(out), progress=False)
    return DreamBoothConfig.from_dict({**values, **changes})


def unet_output(unet: torch.nn.Module) -> torch.Tensor:
    """The UNet's prediction on fixed latents ``(1, 4, 8, 8)``, timestep and text states ``(1, 7, 16)``."""
    gen = torch.Generator().manual_seed(123)
    x, states = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 7, 16, generator=gen)
    unet.eval()
    with torch.no_grad():
        return unet(x, torch.tensor([37]), states).sample


def run_unet(assets: dict[str, Path], run: Path) -> torch.nn.Module:
    """The trained run's own UNet: the base pipeline's UNet with the run's adapter."""
    return load_adapter(load_pipeline(str(assets["pipeline"])).unet, run / "adapter")


def test_attach_on_unet_targets_the_attention_projections_and_keeps_outputs(assets):
    unet = load_pipeline(str(assets["pipeline"])).unet
    before = unet_output(unet)
    attach(unet, TSDConfig(method="dash", r=R, target_modules=list(UNET_ATTENTION_TARGETS)))
    adapted = [name for name, module in unet.named_modules() if type(module).__name__ == "TSDLinear"]
    # Four transformer blocks (down 1, mid 1, up 2: layers_per_block + 1), each with self- and cross-attention:
    # 8 attentions × 4 projections.
    assert len(adapted) == 32
    assert {name.split(".attn")[1].split(".", 1)[1] for name in adapted} == set(UNET_ATTENTION_TARGETS)
    torch.testing.assert_close(unet_output(unet), before, rtol=0, atol=0)


def test_attach_on_an_sd3_transformer_with_the_feed_forward_keeps_outputs():
    # SD3's (and Flux's) transformer backbone: its projections are nn.Linear under the same names, plus the
    # feed-forward (ff.net.0.proj, ff.net.2), which `--target-modules` can add.
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=2, caption_projection_dim=16, joint_attention_dim=16,
                                  pooled_projection_dim=16, out_channels=4).eval()
    gen = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 4, 8, 8, generator=gen),
                  encoder_hidden_states=torch.randn(1, 5, 16, generator=gen),
                  pooled_projections=torch.randn(1, 16, generator=gen), timestep=torch.tensor([3]))
    with torch.no_grad():
        before = model(**inputs).sample
    targets = [*UNET_ATTENTION_TARGETS, "ff.net.0.proj", "ff.net.2"]
    attach(model, TSDConfig(method="dash", r=R, target_modules=targets))
    adapted = [name for name, module in model.named_modules() if type(module).__name__ == "TSDLinear"]
    assert len(adapted) == 2 * len(targets)  # two blocks; the context stream (ff_context, add_*_proj) untouched
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).sample, before, rtol=0, atol=0)


@pytest.mark.parametrize("method", sorted(EXPORTED_RANK))
def test_exported_lora_loads_into_stock_pipeline_and_equals_the_run(assets, tmp_path, method):
    from diffusers import StableDiffusionPipeline

    summary = run_dreambooth(config(assets, tmp_path / "run", method=method))
    assert summary["phase"] == ("prelaunch" if method == "lora" else "switched")
    out = export_diffusers(str(tmp_path / "run"), str(tmp_path / "lora"))
    tensors = load_file(str(out / LORA_WEIGHTS_FILE))
    ranks = {t.shape[0] for k, t in tensors.items() if k.endswith("lora_A.weight")}
    assert ranks == {EXPORTED_RANK[method]}
    assert all(k.startswith("unet.") for k in tensors)
    pipe = StableDiffusionPipeline.from_pretrained(str(assets["pipeline"]), safety_checker=None)
    base = unet_output(pipe.unet)
    pipe.load_lora_weights(str(out))
    loaded, own = unet_output(pipe.unet), unet_output(run_unet(assets, tmp_path / "run"))
    assert (loaded - own).abs().max().item() <= 1e-4
    assert (loaded - base).abs().max().item() > 1e-3


def test_sdxl_pipeline_trains_with_its_added_conditioning_and_exports(assets, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    sdxl = make_sdxl_pipeline(tmp_path)
    summary = run_dreambooth(config(assets, tmp_path / "run", model=str(sdxl), method="dash"))
    assert summary["model"]["pipeline"] == "StableDiffusionXLPipeline"
    out = export_diffusers(str(tmp_path / "run"), str(tmp_path / "lora"))
    gen = torch.Generator().manual_seed(1)
    x, states = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 7, 32, generator=gen)
    added = {"text_embeds": torch.randn(1, 16, generator=gen), "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}

    def output(unet: torch.nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return unet.eval()(x, torch.tensor([37]), states, added_cond_kwargs=added).sample

    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl))
    base = output(pipe.unet)
    pipe.load_lora_weights(str(out))
    own = output(load_adapter(StableDiffusionXLPipeline.from_pretrained(str(sdxl)).unet, tmp_path / "run" / "adapter"))
    assert (output(pipe.unet) - own).abs().max().item() <= 1e-4
    assert (output(pipe.unet) - base).abs().max().item() > 1e-3


def test_merged_export_is_a_pipeline_with_the_trained_unet(assets, tmp_path):
    from diffusers import StableDiffusionPipeline

    run_dreambooth(config(assets, tmp_path / "run", method="tsd"))
    out = export_diffusers(str(tmp_path / "run"), str(tmp_path / "merged"), merged=True)
    merged = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None)
    own = unet_output(run_unet(assets, tmp_path / "run"))
    assert (unet_output(merged.unet) - own).abs().max().item() <= 1e-4
    with pytest.raises(Exception, match="already exists"):
        export_diffusers(str(tmp_path / "run"), str(tmp_path / "merged"), merged=True)


@pytest.mark.parametrize("method", ["dash", "tsd"])
def test_resume_is_bit_exact(assets, tmp_path, method):
    # 6 steps, the switch after step 2, checkpoints at 3 and 6: resuming from step 3 (after the switch) must
    # reproduce the uninterrupted adapter bit for bit (dropout on: its RNG state comes from the checkpoint).
    run = tmp_path / "run"
    run_dreambooth(config(assets, run, method=method, steps=6, checkpoint_every=3, dropout=0.1))
    full = load_file(str(run / "adapter" / TENSORS_FILE))
    shutil.rmtree(run / "checkpoints" / "step-0000006")
    shutil.rmtree(run / "adapter")
    summary = run_dreambooth(config(assets, run), resume=True)
    assert summary["resumed_from"].endswith("step-0000003")
    logged = [line for line in (run / "metrics.jsonl").read_text().splitlines() if '"event": "step"' in line]
    assert len(logged) == 6  # steps 4-6 logged once: the first run's lines after the checkpoint were dropped
    resumed = load_file(str(run / "adapter" / TENSORS_FILE))
    assert resumed.keys() == full.keys()
    for key in full:
        assert torch.equal(resumed[key], full[key]), key


def test_prior_preservation_adds_the_weighted_class_loss(assets, tmp_path):
    pipe = load_pipeline(str(assets["pipeline"]))
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    plain = config(assets, tmp_path / "a")
    prior = dict(class_images=str(assets["class_images"]), class_prompt="a photo of dog")
    unet = pipe.unet
    data_plain = prepare_data(pipe, plain)
    data_prior = prepare_data(pipe, config(assets, tmp_path / "b", **prior))
    with torch.no_grad():
        alone = step_loss(unet, scheduler, data_plain, plain, step=3)
        zero_weight = step_loss(unet, scheduler, data_prior, config(assets, tmp_path / "b", prior_weight=0.0, **prior),
                                step=3)
        weighted = step_loss(unet, scheduler, data_prior, config(assets, tmp_path / "b", prior_weight=2.0, **prior),
                             step=3)
    assert torch.equal(zero_weight, alone)  # the instance draw comes first from the step's generator
    assert weighted.item() > alone.item()


class _ZeroUNet(torch.nn.Module):
    def forward(self, sample, timesteps, **cond):
        return type("Out", (), {"sample": torch.zeros_like(sample)})()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_target_follows_the_scheduler_prediction_type(prediction_type):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    loss = noise_prediction_loss(_ZeroUNet(), scheduler, latents, {}, torch.Generator().manual_seed(5))
    gen = torch.Generator().manual_seed(5)  # the same draws: noise, then the timestep
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.randint(0, 100, (1,), generator=gen)
    target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
    torch.testing.assert_close(loss, target.pow(2).mean())


def test_samples_before_and_after_in_one_png(assets, tmp_path):
    from PIL import Image

    summary = run_dreambooth(config(assets, tmp_path / "run", samples=2, steps=2))
    with Image.open(summary["outputs"]["samples"]) as grid:
        assert grid.size == (2 * 32, 2 * 32)  # two seeds side by side; before above after
        top, bottom = grid.crop((0, 0, 64, 32)), grid.crop((0, 32, 64, 64))
        assert top.tobytes() != bottom.tobytes()


def test_gradient_checkpointing_trains_the_same_adapter(assets, tmp_path):
    run_dreambooth(config(assets, tmp_path / "plain", steps=3))
    run_dreambooth(config(assets, tmp_path / "ckpt", steps=3, gradient_checkpointing=True))
    plain = load_file(str(tmp_path / "plain" / "adapter" / TENSORS_FILE))
    recomputed = load_file(str(tmp_path / "ckpt" / "adapter" / TENSORS_FILE))
    assert plain.keys() == recomputed.keys()
    for key in plain:
        torch.testing.assert_close(recomputed[key], plain[key], rtol=0, atol=1e-6)
    assert any(t.abs().max() > 0 for k, t in plain.items() if "lora_B" in k)  # it trained


def test_gradient_estimator_switches_before_the_first_step(assets, tmp_path):
    # tsd without --prelaunch-steps ranks by the gradient probe over --probe-batches draws, then trains switched.
    import json

    summary = run_dreambooth(config(assets, tmp_path / "run", method="tsd", prelaunch_steps=None, steps=2))
    assert summary["config"]["init_estimator"] == "gradient"
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [s["phase"] for s in steps if s["event"] == "step"] == ["switched", "switched"]
    assert [s["step"] for s in steps if s["event"] == "switch"] == [0]  # the probe switched before step 1
