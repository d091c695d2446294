"""Loading a diffusers pipeline (local folder or Hub id) and the per-prompt conditioning its UNet takes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lora_tsd.app.errors import DataError

MODEL_INDEX = "model_index.json"


def load_pipeline(model: str) -> Any:
    """A ``DiffusionPipeline`` in fp32 from a folder with ``model_index.json`` or a Hub id (no safety checker)."""
    from diffusers import DiffusionPipeline

    path = Path(model)
    if path.exists() and not (path / MODEL_INDEX).is_file():
        raise DataError(f"--model {model!r} is not a diffusers pipeline folder (no {MODEL_INDEX}); give a folder "
                        "saved by DiffusionPipeline.save_pretrained or a Hub id")
    try:
        components = DiffusionPipeline.load_config(model)
        # Generated samples are the user's own subject: skip loading SD 1.x's safety checker (SDXL has none).
        extra = {"safety_checker": None} if "safety_checker" in components else {}
        pipe = DiffusionPipeline.from_pretrained(model, dtype=torch.float32, **extra)
    except (OSError, ValueError) as err:
        raise DataError(f"cannot load the diffusion pipeline {model!r}: {str(err).splitlines()[0]}") from None
    if not hasattr(pipe, "unet"):
        raise DataError(f"pipeline {model!r} ({type(pipe).__name__}) has no UNet; dreambooth trains UNet pipelines "
                        "(Stable Diffusion 1.x/2.x, SDXL)")
    pipe.set_progress_bar_config(disable=True)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, part, None)
        if module is not None:
            module.requires_grad_(False)
    return pipe


def unet_conditioning(pipe: Any, prompt: str, resolution: int) -> dict[str, Any]:
    """The UNet's keyword inputs for ``prompt`` (batch 1): ``encoder_hidden_states``, and for SDXL the pooled text
    embedding and the size/crop ids in ``added_cond_kwargs``."""
    with torch.no_grad():
        encoded = pipe.encode_prompt(prompt, device=pipe.device, num_images_per_prompt=1,
                                     do_classifier_free_guidance=False)
    if getattr(pipe, "text_encoder_2", None) is None:  # SD 1.x/2.x: (embeds, negative embeds)
        return {"encoder_hidden_states": encoded[0]}
    embeds, _, pooled, _ = encoded  # SDXL: (embeds, negative, pooled, negative pooled)
    # SDXL's micro-conditioning: original size, crop corner, target size (the images are resized to resolution).
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=embeds.dtype,
                            device=embeds.device)
    return {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
