"""Turn task examples into model batches, for the two model kinds.

- Encoder + classification: ``text`` → tokens, ``label`` → class id; the model's own cross-entropy loss.
- Decoder + anything: every example becomes a *(context, continuation)* pair scored by the causal LM.
  Multiple choice trains on the correct choice and is scored per choice by log-likelihood (lm-eval's
  ``acc`` and length-normalized ``acc_norm``); classification is multiple choice over the label names;
  generation trains on the completion and is scored by greedy decoding.

Decoder batches are *left*-padded so every continuation ends at the last position: the model then only
computes logits for the last K positions (``logits_to_keep``), which keeps the vocabulary projection, the
largest activation of a small LM, out of the sequence length. The loss is on continuation tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from lora_tsd.errors import ConfigError

Example = dict[str, Any]


def mc_context(example: Example) -> str:
    """The prompt of a multiple-choice example (BIG-bench inputs usually end with the question)."""
    return f"{example['input'].rstrip()}\nAnswer:"


def mc_continuation(choice: str) -> str:
    return f" {str(choice).strip()}"


def as_choice_example(example: Example, kind: str, labels: list[str]) -> Example:
    """A multiple-choice view of a classification example (decoders score the label names)."""
    if kind == "multiple_choice":
        return example
    return {"input": example["text"], "choices": list(labels), "label": example["label"]}


@dataclass
class DecoderEncoder:
    """Tokenizes (context, continuation) pairs for a causal LM and collates them left-padded."""

    tokenizer: Any
    max_length: int

    def pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        ctx = self.tokenizer(context, add_special_tokens=True)["input_ids"]
        cont = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
        if not cont:
            raise ConfigError(f"continuation {continuation!r} tokenizes to nothing")
        cont = cont[: self.max_length // 2]
        keep = self.max_length - len(cont)
        return ctx[-keep:], cont  # truncate the context from the left: the question sits at its end

    def collate(self, pairs: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
        """Left-padded ``input_ids``/``attention_mask``/``position_ids`` ``(B, L)`` and right-aligned
        ``targets``/``target_mask`` ``(B, K)``, K = the longest continuation."""
        pad = self.tokenizer.pad_token_id
        seqs = [ctx + cont for ctx, cont in pairs]
        length = max(len(s) for s in seqs)
        k = max(len(cont) for _, cont in pairs)
        ids = torch.full((len(seqs), length), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), length), dtype=torch.long)
        targets = torch.full((len(seqs), k), pad, dtype=torch.long)
        target_mask = torch.zeros((len(seqs), k), dtype=torch.bool)
        for row, ((_, cont), seq) in enumerate(zip(pairs, seqs, strict=True)):
            ids[row, length - len(seq):] = torch.tensor(seq)
            mask[row, length - len(seq):] = 1
            targets[row, k - len(cont):] = torch.tensor(cont)
            target_mask[row, k - len(cont):] = True
        position_ids = (mask.cumsum(dim=1) - 1).clamp_min(0)
        return {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids, "targets": targets,
                "target_mask": target_mask}


def continuation_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token log-probabilities of the continuation tokens, ``(B, K)`` (0 where ``target_mask`` is off)."""
    k = batch["targets"].shape[1]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=k + 1)
    logits = out.logits[:, :-1].float()  # position j predicts token j+1
    logp = torch.gather(F.log_softmax(logits, dim=-1), 2, batch["targets"].unsqueeze(-1)).squeeze(-1)
    return logp * batch["target_mask"]


def continuation_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean negative log-likelihood of the continuation tokens (answer-only loss)."""
    logp = continuation_logprobs(model, batch)
    return -logp.sum() / batch["target_mask"].sum().clamp_min(1)


def encode_classification(tokenizer: Any, examples: list[Example], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenized, right-padded encoder batch with ``labels``."""
    enc = tokenizer([e["text"] for e in examples], padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt")
    enc["labels"] = torch.tensor([int(e["label"]) for e in examples], dtype=torch.long)
    return dict(enc)
