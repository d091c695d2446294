"""The sizes and repetitions of one ``lora-tsd bench`` run: the issue's shapes by default, tiny ones for ``--quick``."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Settings:
    """Sizes and repetitions of one bench run (defaults: the issue's shapes, a ~10 min run on 2 cores)."""

    tokens: int = 2048
    reps: int = 5
    warmup: int = 1
    rank: int = 8
    dash: int = 8
    threads: int = 0
    input_grad: bool = False
    layer_shapes: list[tuple[int, int]] = field(default_factory=lambda: [(4096, 4096), (11008, 4096)])
    # MiniLM (all-MiniLM-L6-v2): BERT, hidden 384, 6 layers, 12 heads, intermediate 1536, vocab 30522.
    minilm: dict[str, int] = field(default_factory=lambda: dict(
        hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, vocab_size=30522))
    minilm_batch: tuple[int, int] = (16, 128)
    # SmolLM2-135M: Llama, hidden 576, 30 layers, 9 heads / 3 kv heads, intermediate 1536, vocab 49152, tied.
    smol: dict[str, int] = field(default_factory=lambda: dict(
        hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
        intermediate_size=1536, vocab_size=49152))
    smol_batch: tuple[int, int] = (4, 128)
    # The switch: 30 layers × (q, o 576×576; k, v 192×576; gate, up 1536×576; down 576×1536) = 210 matrices.
    switch_layers: int = 30
    switch_dims: tuple[int, int, int] = (576, 192, 1536)  # (hidden, kv width, intermediate)
    switch_reps: int = 2
    sweep_sizes: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096])
    sweep_svd_max: int = 2048
    sweep_dim: int = 2048
    sweep_s: list[int] = field(default_factory=lambda: [1, 8, 32, 128])
    sweep_r: list[int] = field(default_factory=lambda: [4, 8, 32, 128])
    quick: bool = False

    @classmethod
    def quick_settings(cls) -> Settings:
        """Every row on tiny shapes (seconds): a smoke test of the bench, not a measurement."""
        return cls(tokens=32, reps=2, warmup=1, layer_shapes=[(64, 64), (172, 64)],
                   minilm=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                               vocab_size=128),
                   minilm_batch=(2, 8),
                   smol=dict(hidden_size=36, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
                             intermediate_size=96, vocab_size=128),
                   smol_batch=(1, 8), switch_layers=2, switch_dims=(36, 12, 96), switch_reps=1,
                   sweep_sizes=[32, 64], sweep_svd_max=64, sweep_dim=64, sweep_s=[1, 8], sweep_r=[4, 8],
                   quick=True)
