"""The DreamBooth run's configuration: the options of ``train`` that apply to a diffusion run (the adapter's, steps,
seed, checkpoints, progress, output folder), reusing :class:`~lora_tsd.app.workflow.config.TrainConfig`'s flat view,
plus the pipeline, the subject images and prompts, prior preservation and sampling."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from lora_tsd.app.workflow.config import ADAPTER_OPTIONS, EXTERNAL_METHODS, TrainConfig
from lora_tsd.config import DictConfig, TSDConfig, option, short_repr
from lora_tsd.errors import ConfigError

#: The UNet's attention projections (SD 1.x/2.x, SDXL); SD3 / Flux transformers name theirs the same way.
UNET_ATTENTION_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
RUN_MARKER = "dreambooth_config.json"


def default_diffusion_adapter() -> TSDConfig:
    """LoRA-Dash (the paper's subject-driven setting) on the UNet's attention projections, no dropout."""
    return TSDConfig(method="dash", target_modules=list(UNET_ATTENTION_TARGETS))


@dataclass
class DreamBoothConfig(DictConfig):
    """A DreamBooth run. Flags are the flat names of :meth:`option_names` (the adapter's options flattened)."""

    ADAPTER_HELP: ClassVar[dict[str, str]] = {
        "target_modules": "module-name suffixes to adapt, or one regex matching the full name (default: the "
                          "attention projections to_q to_k to_v to_out.0; the feed-forward is ff.net.0.proj ff.net.2)"}

    model: str | None = option(None, "diffusers pipeline folder (with model_index.json) or Hugging Face Hub id, "
                                     "e.g. stabilityai/stable-diffusion-xl-base-1.0")
    images: str | None = option(None, "folder of instance images of the subject (png, jpg, jpeg, webp, bmp)")
    prompt: str | None = option(None, "instance prompt naming the subject, e.g. 'a photo of sks dog'")
    class_images: str | None = option(None, "prior preservation: folder of class images, e.g. other dogs")
    class_prompt: str | None = option(None, "prior preservation: class prompt, e.g. 'a photo of a dog'")
    prior_weight: float = option(1.0, "prior preservation: weight of the class images' loss")
    resolution: int = option(1024, "training and sampling resolution in pixels (square; center crop)")
    output_dir: str = option("runs/dreambooth", "run folder (must not exist unless --overwrite)")
    overwrite: bool = option(False, "replace an existing run folder")
    adapter: TSDConfig = option(help="the adapter (flat options: method, r, alpha, ...)",
                                default_factory=default_diffusion_adapter)
    steps: int = option(500, "optimizer steps (one instance image, plus one class image with prior preservation)")
    lr: float = option(1e-4, "learning rate (AdamW, constant after a linear warm-up)")
    warmup_steps: int = option(0, "linear warm-up steps")
    max_grad_norm: float = option(1.0, "gradient clipping norm (0 disables)")
    seed: int = option(0, "seed of initialization, image order, noise and timesteps")
    checkpoint_every: int = option(0, "save a resumable checkpoint every N optimizer steps (0: none; the newest 2 "
                                      "are kept)")
    bf16: bool = option(False, "bf16 autocast of the UNet's training forward (GPU; samples stay fp32)")
    gradient_checkpointing: bool = option(False, "recompute the UNet's activations in the backward pass (less memory, "
                                                 "about a third more time; SDXL at 1024 px on a 24-40 GiB GPU)")
    probe_batches: int = option(4, "images of the gradient probe (init/tsd with the gradient estimator switch before "
                                   "training, ranking by the accumulated full-weight gradient)")
    samples: int = option(2, "sample images for the instance prompt before and after training (seeds 0..N-1)")
    sample_steps: int = option(25, "denoising steps of each sample")
    guidance_scale: float = option(5.0, "classifier-free guidance of the samples")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self) -> None:
        self.check_types()
        for name in ("model", "images", "prompt"):
            if getattr(self, name) is None:
                raise ConfigError(f"--{name} is required")
        if (self.class_images is None) != (self.class_prompt is None):
            raise ConfigError("prior preservation needs both --class-images and --class-prompt")
        for name in ("steps", "resolution", "sample_steps", "probe_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("checkpoint_every", "warmup_steps", "samples"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be an integer ≥ 0, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ConfigError(f"lr must be positive, got {self.lr!r}")
        if self.resolution % 8:
            raise ConfigError(f"resolution must be a multiple of 8, got {self.resolution}")

    @property
    def method(self) -> str:
        return self.adapter.method

    # The flat view is TrainConfig's (the same adapter options, the same JSON layout).
    option_names = classmethod(TrainConfig.option_names.__func__)
    to_dict = TrainConfig.to_dict

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        defaults = TrainConfig.option_defaults.__func__(cls)
        return {**defaults, **{k: v for k, v in default_diffusion_adapter().given_options().items()
                               if k in ADAPTER_OPTIONS}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DreamBoothConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a DreamBooth config must be a mapping of option names to values, got "
                              f"{short_repr(data)}")
        if data.get("method") in EXTERNAL_METHODS:
            raise ConfigError(f"method {data['method']!r} is a PEFT baseline of `train`; dreambooth trains the "
                              "lora-tsd methods")
        adapter = {k: v for k, v in default_diffusion_adapter().given_options().items() if k in ADAPTER_OPTIONS}
        return TrainConfig.from_dict.__func__(cls, {**adapter, **data})

    def tsd_config(self) -> TSDConfig:
        return self.adapter.with_options(seed=self.seed)
