"""Subject-driven generation on diffusers pipelines: DreamBooth-style training of a TSD adapter on the UNet, sample
grids before and after, and export as a LoRA that stock ``pipeline.load_lora_weights`` loads.

Only this subpackage imports ``diffusers`` (the ``diffusion`` extra); the core library never does.
"""
