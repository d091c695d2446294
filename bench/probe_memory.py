"""Peak resident memory of LoRA-Init's gradient probe, all layers at once vs grouped, against a LoRA step (CPU).

    PYTHONPATH=src python bench/probe_memory.py            # 8 Llama layers of 1024/2816, fp32 (about a minute)
    PYTHONPATH=src python bench/probe_memory.py --tiny     # a seconds-long smoke run

The model's adapted weights dominate its memory (vocabulary 512), as in a real LLM. Each case builds a fresh
model and measures the peak resident set while it runs (``rss_peak_extra``: VmHWM reset, glibc's free heap
trimmed) plus the tensors alive before it (weights, optimizer state, batch): the LoRA case one training step
after a warm-up step (AdamW state allocated), the probe cases ``gradient_probe`` over the same batches, the
switch's SVDs included. Prints one JSON object: peak bytes per case and the ratios to the LoRA step.
"""

from __future__ import annotations

import argparse
import gc
import json

import torch

import lora_tsd
from lora_tsd.app.bench.measure import rss_peak_extra, static_bytes
from lora_tsd.app.bench.model_cases import random_llama

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FULL = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 16,
        "num_key_value_heads": 16, "vocab_size": 512, "max_position_embeddings": 256}
TINY = {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "vocab_size": 64, "max_position_embeddings": 64}


def loss_fn(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, labels=ids).loss


def build(sizes: dict, method: str, **adapter: object) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = random_llama(sizes, seed=0)
    model.train()
    config = lora_tsd.TSDConfig(method=method, r=16, target_modules=PROJECTIONS, **adapter)
    lora_tsd.attach(model, config)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, opt


def lora_step_peak(sizes: dict, batches: list[torch.Tensor]) -> int:
    model, opt = build(sizes, "lora")

    def train_step() -> None:
        loss_fn(model, batches[0]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    train_step()  # the optimizer state exists from here on, as in training
    return static_bytes(model, opt, batches[:1]) + rss_peak_extra(train_step)


def probe_peak(sizes: dict, batches: list[torch.Tensor], groups: int) -> int:
    model, opt = build(sizes, "tsd", dash_directions=8, init_estimator="gradient", dropout=0.0)
    n_layers = len(lora_tsd.adapted_layers(model))
    group_size = None if groups == 1 else -(-n_layers // groups)
    static = static_bytes(model, opt, batches)
    return static + rss_peak_extra(lambda: lora_tsd.gradient_probe(model, batches, loss_fn, opt, group_size))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (a smoke run)")
    parser.add_argument("--groups", type=int, default=8, help="layer groups of the grouped probe")
    parser.add_argument("--batches", type=int, default=4, help="probe batches (each 2 x 128 tokens)")
    args = parser.parse_args(argv)
    sizes = TINY if args.tiny else FULL
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, sizes["vocab_size"], (2, 32 if args.tiny else 128), generator=gen)
               for _ in range(args.batches)]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = {}
    for name, run in (("lora_step", lambda: lora_step_peak(sizes, batches)),
                      ("probe_all_layers", lambda: probe_peak(sizes, batches, 1)),
                      (f"probe_{args.groups}_groups", lambda: probe_peak(sizes, batches, args.groups))):
        gc.collect()
        results[name] = run()
    base = results["lora_step"]
    report = {"sizes": sizes, "peak_mib": {k: round(v / 2**20, 1) for k, v in results.items()},
              "ratio_to_lora_step": {k: round(v / base, 3) for k, v in results.items() if k != "lora_step"}}
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
