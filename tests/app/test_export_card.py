"""Self-describing exports: the real base (found offline), the task's label names, and a model card."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_assets import make_encoder, sentiment_rows, write_jsonl

from lora_tsd.app.assets.models import model_cache_path
from lora_tsd.app.cli import main
from lora_tsd.app.workflow.config import TrainConfig
from lora_tsd.app.workflow.export_card import base_reference, train_command

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture(scope="module")
def named_task(tmp_path_factory):
    root = tmp_path_factory.mktemp("named")
    rows = [{"text": r["text"], "label": ["negative", "positive"][r["label"]]} for r in sentiment_rows(60)]
    return {"encoder": make_encoder(root / "tiny-bert"), "task": write_jsonl(root / "named.jsonl", rows)}


def test_the_base_of_each_kind_of_model(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_TSD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty HF cache: the Hub id is not offline
    minilm = base_reference("minilm")
    assert minilm.name_or_path == str((tmp_path / "cache" / "models" / "minilm").resolve())
    assert minilm.hub_id == "sentence-transformers/all-MiniLM-L6-v2"
    assert "is not in this machine's Hugging Face cache" in minilm.provenance
    smol = base_reference("smollm2-135m")
    assert smol.name_or_path == str(model_cache_path("smollm2-135m").resolve()) and smol.hub_id is None
    assert "a Q4_1 GGUF dequantized to float32" in smol.provenance
    assert "These weights differ from the Hub's" in smol.provenance
    folder = tmp_path / "my-model"
    folder.mkdir()
    assert base_reference(str(folder)).name_or_path == str(folder.resolve())
    assert base_reference("org/some-model").name_or_path == "org/some-model"


def test_the_command_states_the_options_that_differ_from_the_defaults():
    cfg = TrainConfig.from_dict({"method": "dash", "r": 4, "steps": 300, "output_dir": "x", "progress": False})
    assert train_command(cfg) == "lora-tsd train --method dash --r 4 --steps 300"
    assert train_command(TrainConfig()) == "lora-tsd train"


def test_exports_name_their_base_labels_and_carry_a_card(tmp_path, named_task, capsys):
    run = tmp_path / "run"
    assert main(["train", "--model", str(named_task["encoder"]), "--task", f"jsonl:{named_task['task']}",
                 "--steps", "2", "--warmup-steps", "0", "--batch-size", "8", "--max-eval", "8", "--no-progress",
                 "--output-dir", str(run)]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "peft")]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "merged"), "--merged"]) == 0
    for peft_folder in (tmp_path / "peft", run / "peft"):  # `lora-tsd export` and the run's own PEFT export
        adapter_config = json.loads((peft_folder / "adapter_config.json").read_text())
        assert adapter_config["base_model_name_or_path"] == str(named_task["encoder"].resolve())
    merged = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert merged["id2label"] == {"0": "negative", "1": "positive"}
    assert merged["label2id"] == {"negative": 0, "positive": 1}
    card = (tmp_path / "peft" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n")
    summary = json.loads((run / "summary.json").read_text())
    accuracy = summary["metrics_after"]["test"]["accuracy"]
    for fact in ("# tsd r=8 on jsonl:", "- method: `tsd`; LoRA rank r = 8, alpha = 16, dropout 0.05",
                 "- dash directions s = 8", "- labels (id: name): 0: negative, 1: positive",
                 "- examples: train 48, validation 6, test 6", f"| test | after training | accuracy {accuracy:.4f}",
                 f"lora-tsd train --model {named_task['encoder']} --task jsonl:{named_task['task']} --steps 2 "
                 "--batch-size 8 --warmup-steps 0 --max-eval 8",
                 "num_labels=2, id2label={0: 'negative', 1: 'positive'})"):
        assert fact in card, fact
    assert (tmp_path / "merged" / "README.md").read_text().startswith("---\nlibrary_name: transformers\n")


LOAD_OFFLINE = """
import sys, torch
from peft import AutoPeftModelForSequenceClassification
from transformers import AutoModelForSequenceClassification, AutoTokenizer
export, merged = sys.argv[1], sys.argv[2]
model = AutoPeftModelForSequenceClassification.from_pretrained(export).eval()
plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
tok = AutoTokenizer.from_pretrained(merged)
batch = tok(["the movie was very good", "the food was awful"], return_tensors="pt", padding=True)
with torch.no_grad():
    print((model(**batch).logits - plain(**batch).logits).abs().max().item(), plain.config.id2label[1])
"""


@pytest.mark.integration
def test_stock_peft_loads_an_export_of_the_embedded_minilm_offline(tmp_path, named_task):
    run = tmp_path / "run"
    assert main(["train", "--model", "minilm", "--task", f"jsonl:{named_task['task']}", "--steps", "2",
                 "--warmup-steps", "0", "--batch-size", "8", "--max-eval", "8", "--max-length", "16",
                 "--no-progress", "--output-dir", str(run)]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "peft")]) == 0
    assert main(["export", str(run), "--out", str(tmp_path / "merged"), "--merged"]) == 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(SRC)}
    done = subprocess.run([sys.executable, "-c", LOAD_OFFLINE, str(tmp_path / "peft"), str(tmp_path / "merged")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    difference, label = done.stdout.split()
    assert float(difference) < 1e-5 and label == "positive"
