"""Sizes of a LoRA-Dash adapter on SDXL base's UNet, from its architecture alone (meta device: nothing downloaded,
no memory used).

    PYTHONPATH=src python bench/sdxl_adapter_size.py [--rank 8] [--dash-directions 8]

The UNet config is stabilityai/stable-diffusion-xl-base-1.0's ``unet/config.json`` written out here (the Hub is not
reachable offline); its parameter count (2.567 B) matches the published model, which checks the transcription.
"""

from __future__ import annotations

import argparse

import torch

SDXL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, norm_num_groups=32)
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def main() -> None:
    from diffusers import UNet2DConditionModel

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--dash-directions", type=int, default=8)
    args = parser.parse_args()
    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_UNET)
    total = sum(p.numel() for p in unet.parameters())
    layers = [m for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(TARGETS)]
    r, s = args.rank, args.dash_directions
    trainable = sum(r * (m.in_features + m.out_features) + s for m in layers)
    exported = sum((r + s) * (m.in_features + m.out_features) for m in layers)
    print(f"SDXL UNet parameters: {total / 1e9:.3f} B; adapted layers ({', '.join(TARGETS)}): {len(layers)}")
    print(f"LoRA-Dash r={r}, s={s}: {trainable / 1e6:.2f} M trainable ({100 * trainable / total:.2f}% of the UNet)")
    print(f"diffusers export (rank r+s={r + s}, fp32): {exported / 1e6:.2f} M values, {exported * 4 / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
