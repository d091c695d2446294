"""Tiny real-format model folders (config, safetensors weights, tokenizer) and task files for CLI tests."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = ("good great fine happy love nice bad awful sad hate poor ugly the a movie food was is it very not "
         "question answer yes no red blue green what color sky grass sum of and plus one two three four five "
         "six seven eight nine zero").split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[BOS]", "[EOS]"]


def _tokenizer(path: Path, encoder: bool) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS + [str(d) for d in range(10)] + [":", "?", ".", "+"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(),
                                                 pre_tokenizers.Digits(individual_digits=True)])
    kwargs = dict(unk_token="[UNK]", pad_token="[PAD]")
    if encoder:
        kwargs.update(cls_token="[CLS]", sep_token="[SEP]")
    else:
        kwargs.update(bos_token="[BOS]", eos_token="[EOS]")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    fast.save_pretrained(path)
    return fast


def make_encoder(path: Path, dropout: float = 0.1) -> Path:
    """A tiny BERT; ``dropout=0`` makes training independent of the RNG stream (for cross-process equality)."""
    tok = _tokenizer(path, encoder=True)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, pad_token_id=tok.pad_token_id,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    BertModel(cfg).save_pretrained(path)
    return path


def make_decoder(path: Path, hidden_size: int = 32, intermediate_size: int = 64) -> Path:
    """A tiny Llama; bitsandbytes' CPU 4-bit kernel needs every in-feature count a multiple of 64."""
    tok = _tokenizer(path, encoder=False)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sentiment_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    pos, neg = "good great fine happy love nice".split(), "bad awful sad hate poor ugly".split()
    rows = []
    for i in range(n):
        label = i % 2
        word = rng.choice(pos if label else neg)
        rows.append({"text": f"the movie was very {word}", "label": label})
    return rows


def choice_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        thing, color = rng.choice([("sky", "blue"), ("grass", "green")])
        choices = ["red", "blue", "green"]
        rows.append({"input": f"what color is the {thing} ?", "choices": choices, "label": choices.index(color)})
    return rows


def generation_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    names = "zero one two three four five six seven eight nine".split()
    rows = []
    for _ in range(n):
        a = rng.randrange(5)
        rows.append({"prompt": f"{a} plus one ?", "completion": names[a + 1]})
    return rows
