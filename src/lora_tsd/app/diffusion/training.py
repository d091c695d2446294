"""DreamBooth-style training of a TSD adapter on a diffusers UNet: the noise-prediction loss, optional prior
preservation, checkpoints and a bit-exact ``--resume`` (the workflow's checkpoint code), samples before and after.

Every random draw of a step (image, noise, timestep) comes from a generator seeded by ``(seed, step)``, and dropout's
global RNG state is in the checkpoints, so a resumed run equals the uninterrupted one bit for bit on CPU.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lora_tsd import __version__
from lora_tsd.adapter_io import save_adapter
from lora_tsd.app.diffusion.config import RUN_MARKER, DreamBoothConfig
from lora_tsd.app.diffusion.images import load_image_folder
from lora_tsd.app.diffusion.pipeline import load_pipeline, unet_conditioning
from lora_tsd.app.diffusion.samples import SAMPLES_FILE, sample_images, save_side_by_side
from lora_tsd.app.workflow.backends import TSDBackend
from lora_tsd.app.workflow.checkpoint import find_checkpoint, list_checkpoints, load_trainer_state, save_checkpoint
from lora_tsd.app.workflow.loop import check_resumable
from lora_tsd.app.workflow.outputs import METRICS_FILE, MetricsLog, prepare_output_dir
from lora_tsd.atomic import atomic_write_json
from lora_tsd.errors import ConfigError, NonFiniteError
from lora_tsd.inject import require_adapters, trainable_parameters

BEFORE_DIR = "samples_before"


@dataclass
class SubjectData:
    """VAE latents ``(n, c, h, w)`` and UNet conditioning of the instance (and class) images."""

    instance_latents: torch.Tensor
    instance_cond: dict[str, Any]
    class_latents: torch.Tensor | None = None
    class_cond: dict[str, Any] | None = None


def encode_latents(pipe: Any, images: torch.Tensor) -> torch.Tensor:
    """``(n, 3, H, W)`` images in [-1, 1] → scaled VAE latents (the posterior mean: deterministic)."""
    with torch.no_grad():
        return pipe.vae.encode(images).latent_dist.mean * pipe.vae.config.scaling_factor


def prepare_data(pipe: Any, cfg: DreamBoothConfig) -> SubjectData:
    data = SubjectData(encode_latents(pipe, load_image_folder(cfg.images, cfg.resolution)),
                       unet_conditioning(pipe, cfg.prompt, cfg.resolution))
    if cfg.class_images is not None:
        data.class_latents = encode_latents(pipe, load_image_folder(cfg.class_images, cfg.resolution,
                                                                    "--class-images"))
        data.class_cond = unet_conditioning(pipe, cfg.class_prompt, cfg.resolution)
    return data


def noise_prediction_loss(unet: torch.nn.Module, scheduler: Any, latents: torch.Tensor, cond: dict[str, Any],
                          generator: torch.Generator) -> torch.Tensor:
    """MSE between the UNet's prediction on noised ``latents`` ``(b, c, h, w)`` at random timesteps and the target of
    the scheduler's ``prediction_type`` (the noise ε, or the velocity v)."""
    # Drawn on the CPU from the step's generator (the same numbers on any device), then moved.
    noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],),
                              generator=generator).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    prediction = unet(noisy, timesteps, **cond).sample
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ConfigError(f"the pipeline's scheduler predicts {kind!r}; dreambooth trains epsilon or v_prediction")
    return F.mse_loss(prediction.float(), target.float())


def step_loss(unet: torch.nn.Module, scheduler: Any, data: SubjectData, cfg: DreamBoothConfig, step: int
              ) -> torch.Tensor:
    """The loss of optimizer step ``step``: one instance image (+ ``prior_weight`` × one class image)."""
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    autocast = torch.autocast(data.instance_latents.device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
    with autocast:
        return _draw_and_score(unet, scheduler, data, cfg, generator)


def _draw_and_score(unet: torch.nn.Module, scheduler: Any, data: SubjectData, cfg: DreamBoothConfig,
                    generator: torch.Generator) -> torch.Tensor:
    i = int(torch.randint(len(data.instance_latents), (1,), generator=generator))
    loss = noise_prediction_loss(unet, scheduler, data.instance_latents[i:i + 1], data.instance_cond, generator)
    if data.class_latents is not None:
        j = int(torch.randint(len(data.class_latents), (1,), generator=generator))
        loss = loss + cfg.prior_weight * noise_prediction_loss(unet, scheduler, data.class_latents[j:j + 1],
                                                                data.class_cond, generator)
    return loss


def run_dreambooth(cfg: DreamBoothConfig, resume: bool = False, resume_from: str | None = None) -> dict[str, Any]:
    """Train, sample before/after, save the adapter and ``summary.json``; returns the summary.

    With ``resume``, continue the run in ``cfg.output_dir`` from its newest good checkpoint (or ``resume_from``).
    """
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    started = time.time()
    out = Path(cfg.output_dir)
    ckpt = None
    if resume:
        marker = out / RUN_MARKER
        if not marker.is_file():
            raise ConfigError(f"{str(out)!r} is not a dreambooth run folder (no {RUN_MARKER})")
        cfg = DreamBoothConfig.from_dict({**json.loads(marker.read_text(encoding="utf-8")), "progress": cfg.progress})
        ckpt = find_checkpoint(out, resume_from)
        check_resumable(ckpt, out)
    pipe = load_pipeline(cfg.model)  # bad input fails here, before the run folder is created
    pipe.to(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    data = prepare_data(pipe, cfg)
    if not resume:
        prepare_output_dir(out, cfg.overwrite)
        atomic_write_json(out / RUN_MARKER, cfg.to_dict())
    try:
        return _train(cfg, out, pipe, data, ckpt, DDPMScheduler.from_config(pipe.scheduler.config), tqdm, started)
    except BaseException:
        if not resume and not list_checkpoints(out):  # nothing to resume: leave nothing behind
            shutil.rmtree(out, ignore_errors=True)
        raise


def _train(cfg: DreamBoothConfig, out: Path, pipe: Any, data: SubjectData, ckpt: Path | None, noise_scheduler: Any,
           tqdm: Any, started: float) -> dict[str, Any]:
    backend = TSDBackend(cfg.tsd_config())
    if ckpt is None:
        save_side_by_side(sample_images(pipe, cfg), out / BEFORE_DIR / SAMPLES_FILE)
        torch.manual_seed(cfg.seed)
        unet = backend.attach(pipe.unet)
    else:
        torch.manual_seed(cfg.seed)
        unet = backend.load_checkpoint_adapter(pipe.unet, ckpt / "adapter")
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    warmup = cfg.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    first = 1
    if ckpt is not None:
        first = load_trainer_state(ckpt, unet, optimizer, scheduler).step + 1
    elif backend.needs_probe:  # rank by the full-weight gradient on the first steps' draws, switch, no update
        unet.train()
        backend.probe(unet, range(1, cfg.probe_batches + 1),
                      lambda model, step: step_loss(model, noise_scheduler, data, cfg, step), optimizer)
        unet.zero_grad(set_to_none=True)
    log = MetricsLog(out / METRICS_FILE)
    if ckpt is not None:
        log.truncate_after(first - 1)  # steps logged after the checkpoint are run again
    else:
        log.write({"event": "start", "method": cfg.method, **backend.describe(unet)})
        if backend.needs_probe:
            log.write({"event": "switch", "step": 0, "method": cfg.method, "estimator": "gradient",
                       "probe_batches": cfg.probe_batches})
    unet.train()
    bar = tqdm(total=cfg.steps, initial=first - 1, desc=f"dreambooth {cfg.method} r={cfg.adapter.r}",
               disable=not cfg.progress)
    for step in range(first, cfg.steps + 1):
        loss = step_loss(unet, noise_scheduler, data, cfg, step)
        if not torch.isfinite(loss):
            raise NonFiniteError(f"non-finite loss at optimizer step {step}; the checkpoints in {out / 'checkpoints'} "
                                 "are intact (lower --lr)")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        switched = backend.step(unet, optimizer)
        log.write({"event": "step", "step": step, "loss": loss.item(), "lr": scheduler.get_last_lr()[0],
                   "phase": backend.phase(unet)})
        if switched:
            log.write({"event": "switch", "step": step, "method": cfg.method})
        bar.set_postfix(loss=f"{loss.item():.4f}")
        bar.update(1)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            save_checkpoint(out, step, unet, optimizer, scheduler, extra={"model": cfg.model})
    bar.close()
    unet.eval()
    save_adapter(unet, out / "adapter", base_model_name=cfg.model)
    before = out / BEFORE_DIR / SAMPLES_FILE
    save_side_by_side(sample_images(pipe, cfg), out / SAMPLES_FILE, before=before)
    summary = {
        "lora_tsd_version": __version__,
        "config": cfg.to_dict(),
        "model": {"name": cfg.model, "pipeline": type(pipe).__name__,
                  "adapted_layers": len(require_adapters(unet, "summary")),
                  "trainable_parameters": trainable_parameters(unet)},
        "data": {"instance_images": len(data.instance_latents),
                 "class_images": 0 if data.class_latents is None else len(data.class_latents)},
        "phase": backend.phase(unet),
        "resumed_from": str(ckpt) if ckpt is not None else None,
        "wall_time_s": round(time.time() - started, 2),
        "outputs": {"adapter": str(out / "adapter"), "samples": str(out / SAMPLES_FILE),
                    "metrics": str(out / METRICS_FILE)},
    }
    atomic_write_json(out / "summary.json", summary)
    return summary


