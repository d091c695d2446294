"""A tiny random Stable Diffusion pipeline folder (UNet, CLIP text encoder and tokenizer, VAE, DDPM scheduler) and
instance images, built locally for the diffusion tests (no Hub)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# Every prompt word, with the end-of-word marker of CLIP's BPE, becomes one token through the merges below.
WORDS = "a</w> photo</w> of</w> sks</w> dog</w> cat</w> toy</w> on</w> the</w> beach</w> in</w> red</w>".split()


def _clip_tokenizer(path: Path):
    from transformers import CLIPTokenizer

    chars = sorted({c for w in WORDS for c in w.replace("</w>", "")})
    vocab = ["<|startoftext|>", "<|endoftext|>", *chars, *[c + "</w>" for c in chars]]
    merges: list[str] = []
    for word in WORDS:  # merge each word left to right, so every listed word is one token
        plain, end = (word[:-4], "</w>") if word.endswith("</w>") else (word, "")
        current = plain[0]
        for i, c in enumerate(plain[1:], start=1):
            piece = c + (end if i == len(plain) - 1 else "")
            if f"{current} {piece}" not in merges:
                merges.append(f"{current} {piece}")
            current += piece
            if current not in vocab:
                vocab.append(current)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), model_max_length=16)


def make_pipeline(path: Path, prediction_type: str = "epsilon") -> Path:
    """Save a tiny ``StableDiffusionPipeline`` at ``path/pipeline``: 32px images, 8x8 latents (the VAE's three blocks
    downsample by 4), text states ``(1, 7, 16)`` for a five-word prompt."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tokenizer = _clip_tokenizer(path / "_tokenizer_src")
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 8), latent_channels=4,
                        norm_num_groups=4, sample_size=32)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=16,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type, clip_sample=False,
                              steps_offset=1)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path / "pipeline")
    return path / "pipeline"


def make_sdxl_pipeline(path: Path) -> Path:
    """Save a tiny ``StableDiffusionXLPipeline`` at ``path/sdxl``: two text encoders (hidden 16 each: cross-attention
    32), the pooled projection and size/crop ids as the UNet's added conditioning (6·8 + 16 = 64 inputs)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer = _clip_tokenizer(path / "_tokenizer_src")
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=(2, 4), use_linear_projection=True, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=64)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 8), latent_channels=4,
                        norm_num_groups=4, sample_size=32)
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                                 pad_token_id=1, projection_dim=16)
    scheduler = EulerDiscreteScheduler(num_train_timesteps=100, steps_offset=1)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=CLIPTextModel(text_config),
                                     text_encoder_2=CLIPTextModelWithProjection(text_config), tokenizer=tokenizer,
                                     tokenizer_2=tokenizer, unet=unet, scheduler=scheduler, add_watermarker=False)
    pipe.save_pretrained(path / "sdxl")
    return path / "sdxl"


def make_images(path: Path, n: int = 3, size: int = 32, seed: int = 0) -> Path:
    """``n`` random-noise PNGs (a stand-in subject) in a folder."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path / f"img{i}.png")
    return path
