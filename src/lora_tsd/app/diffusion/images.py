"""Instance and class image folders: read, center-cropped and resized to the training resolution, as tensors."""

from __future__ import annotations

from pathlib import Path

import torch

from lora_tsd.app.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def load_image_folder(folder: str, resolution: int, flag: str = "--images") -> torch.Tensor:
    """Every image of ``folder`` (sorted by name) as a ``(n, 3, resolution, resolution)`` tensor in [-1, 1]."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    path = Path(folder)
    if not path.is_dir():
        raise DataError(f"{flag} {folder!r} is not a folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{flag} {folder!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    tensors = []
    for file in files:
        try:
            with Image.open(file) as img:
                img = img.convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise DataError(f"{flag}: cannot read image {str(file)!r}: {err}") from None
        side = min(img.size)
        left, top = (img.width - side) // 2, (img.height - side) // 2
        img = img.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
        array = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1)
        tensors.append(array / 127.5 - 1.0)
    return torch.stack(tensors)
