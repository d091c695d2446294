"""Sample images for the instance prompt from fixed seeds, and the before/after grid (one PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lora_tsd.atomic import atomic_write

SAMPLES_FILE = "samples.png"


def sample_images(pipe: Any, cfg: Any) -> list[Any]:
    """``cfg.samples`` PIL images of ``cfg.prompt``, image ``i`` from seed ``i`` (the same before and after)."""
    images = []
    with torch.no_grad():
        for seed in range(cfg.samples):
            result = pipe(cfg.prompt, num_inference_steps=cfg.sample_steps, guidance_scale=cfg.guidance_scale,
                          height=cfg.resolution, width=cfg.resolution,
                          generator=torch.Generator().manual_seed(seed), output_type="pil")
            images.append(result.images[0])
    return images


def save_side_by_side(images: list[Any], path: Path, before: Path | None = None) -> Path:
    """One PNG: the ``before`` grid's row (if given) above a row of ``images``."""
    from PIL import Image

    rows = []
    if before is not None and before.is_file():
        with Image.open(before) as img:
            rows.append(img.convert("RGB"))
    if images:
        width, height = images[0].size
        row = Image.new("RGB", (width * len(images), height), "white")
        for i, img in enumerate(images):
            row.paste(img, (i * width, 0))
        rows.append(row)
    if not rows:
        return path
    grid = Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    y = 0
    for row in rows:
        grid.paste(row, (0, y))
        y += row.height
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: grid.save(p, format="PNG"))
    return path
