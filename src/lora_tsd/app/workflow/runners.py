"""How one (model kind, task kind) pair trains and is scored: a loss on a batch of examples, and metrics.

``EncoderClassifier``: an encoder with a sequence-classification head (the head trains in full and is
saved with the adapter). ``DecoderScorer``: a causal LM with answer-only loss, scored per choice by
log-likelihood (``acc``, ``acc_norm`` as lm-eval) or, for generation tasks, by greedy decoding.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lora_tsd.app.workflow.batching import (
    DecoderEncoder,
    as_choice_example,
    continuation_logprobs,
    continuation_loss,
    encode_classification,
    mc_context,
    mc_continuation,
)
from lora_tsd.errors import ConfigError

Example = dict[str, Any]

#: Metric: the share of examples given the most frequent prediction (a class, or a choice position). 1.0 is a
#: constant prediction, the sign of a collapsed run; a well-trained model sits near the label distribution.
TOP_SHARE = "top_prediction_share"
#: Metric: the share of the most frequent correct answer (the accuracy of always predicting it).
MAJORITY_SHARE = "majority_label_share"


def top_prediction_share(predicted: list[int]) -> float:
    """Share of the most frequent value in ``predicted`` (0.0 for an empty list)."""
    if not predicted:
        return 0.0
    return max(Counter(predicted).values()) / len(predicted)


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@dataclass
class EncoderClassifier:
    tokenizer: Any
    max_length: int

    head_names = ("classifier", "score")

    def loss(self, model: nn.Module, examples: list[Example], device: torch.device) -> torch.Tensor:
        batch = {k: v.to(device) for k, v in encode_classification(self.tokenizer, examples, self.max_length).items()}
        return model(**batch).loss

    @torch.no_grad()
    def evaluate(self, model: nn.Module, examples: list[Example], batch_size: int,
                 device: torch.device) -> dict[str, float]:
        correct = 0
        predicted: list[int] = []
        for chunk in _chunks(examples, batch_size):
            batch = encode_classification(self.tokenizer, chunk, self.max_length)
            labels = batch.pop("labels").to(device)
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
            correct += int((logits.argmax(dim=-1) == labels).sum())
            predicted += logits.argmax(dim=-1).tolist()
        labels = [int(e["label"]) for e in examples]
        return {"accuracy": correct / len(examples), TOP_SHARE: top_prediction_share(predicted),
                MAJORITY_SHARE: top_prediction_share(labels)}


@dataclass
class DecoderScorer:
    tokenizer: Any
    max_length: int
    task_kind: str
    labels: list[str]
    scorer: Any = None  # task.score_generation for generation tasks

    def __post_init__(self) -> None:
        self.encoder = DecoderEncoder(self.tokenizer, self.max_length)

    def _train_pair(self, example: Example) -> tuple[list[int], list[int]]:
        if self.task_kind == "generation":
            eos = self.tokenizer.eos_token or ""
            return self.encoder.pair(example["prompt"], f"{example['completion']}{eos}")
        ex = as_choice_example(example, self.task_kind, self.labels)
        return self.encoder.pair(mc_context(ex), mc_continuation(ex["choices"][int(ex["label"])]))

    def loss(self, model: nn.Module, examples: list[Example], device: torch.device) -> torch.Tensor:
        batch = self.encoder.collate([self._train_pair(e) for e in examples])
        return continuation_loss(model, {k: v.to(device) for k, v in batch.items()})

    @torch.no_grad()
    def evaluate(self, model: nn.Module, examples: list[Example], batch_size: int,
                 device: torch.device) -> dict[str, float]:
        if self.task_kind == "generation":
            return self._evaluate_generation(model, examples, batch_size, device)
        views = [as_choice_example(e, self.task_kind, self.labels) for e in examples]
        pairs, owners, lengths = [], [], []
        for index, ex in enumerate(views):
            ctx = mc_context(ex)
            for choice in ex["choices"]:
                cont = mc_continuation(choice)
                pairs.append(self.encoder.pair(ctx, cont))
                owners.append(index)
                lengths.append(len(cont.encode("utf-8")))
        scores = []
        for chunk in _chunks(pairs, batch_size):
            batch = {k: v.to(device) for k, v in self.encoder.collate(chunk).items()}
            scores.append(continuation_logprobs(model, batch).sum(dim=1).float().cpu())
        loglik = torch.cat(scores)
        acc = acc_norm = 0
        start = 0
        predicted: list[int] = []
        for ex in views:
            n = len(ex["choices"])
            ll = loglik[start:start + n]
            norm = ll / torch.tensor(lengths[start:start + n], dtype=torch.float32)
            predicted.append(int(ll.argmax()))
            acc += int(predicted[-1] == int(ex["label"]))
            acc_norm += int(int(norm.argmax()) == int(ex["label"]))
            start += n
        return {"accuracy": acc / len(views), "accuracy_norm": acc_norm / len(views),
                TOP_SHARE: top_prediction_share(predicted),
                MAJORITY_SHARE: top_prediction_share([int(ex["label"]) for ex in views])}

    def _evaluate_generation(self, model: nn.Module, examples: list[Example], batch_size: int,
                             device: torch.device) -> dict[str, float]:
        tok = self.tokenizer
        side = tok.padding_side
        tok.padding_side = "left"
        total = 0.0
        try:
            for chunk in _chunks(examples, batch_size):
                enc = tok([e["prompt"] for e in chunk], return_tensors="pt", padding=True, truncation=True,
                          max_length=self.max_length).to(device)
                longest = max(len(tok(e["completion"], add_special_tokens=False)["input_ids"]) for e in chunk)
                out = model.generate(**enc, max_new_tokens=longest + 8, do_sample=False,
                                     pad_token_id=tok.pad_token_id)
                texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                for text, ex in zip(texts, chunk, strict=True):
                    total += self.scorer(text.strip().split("\n")[0].strip(), ex)
        finally:
            tok.padding_side = side
        return {"accuracy": total / len(examples)}


def check_pair(model_kind: str, task: Any) -> None:
    """A clear error for (model kind, task kind) pairs that cannot work."""
    if model_kind == "encoder" and task.kind != "classification":
        raise ConfigError(f"task {task.name} is a {task.kind.replace('_', '-')} task: encoder models train "
                          "classification tasks only; pick a classification view where the source has one (e.g. "
                          "reasoning-gym:syllogism@classification) or use a decoder model (e.g. --model smollm2-135m)")


def make_runner(model_kind: str, task: Any, tokenizer: Any, max_length: int) -> EncoderClassifier | DecoderScorer:
    """The runner for a model kind and a task."""
    check_pair(model_kind, task)
    if model_kind == "encoder":
        return EncoderClassifier(tokenizer, max_length)
    return DecoderScorer(tokenizer, max_length, task.kind, list(task.labels),
                         scorer=task.score_generation if task.kind == "generation" else None)
