"""`lora-tsd train / eval / export` end to end on tiny local models and tiny JSONL tasks of every kind."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from tiny_assets import choice_rows, generation_rows, make_decoder, make_encoder, sentiment_rows, write_jsonl

from lora_tsd.app.cli import main


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    enc, dec = make_encoder(root / "tiny-bert"), make_decoder(root / "tiny-llama")
    files = {
        "cls": write_jsonl(root / "sentiment.jsonl", sentiment_rows(120)),
        "cls_named": write_jsonl(root / "named.jsonl", [
            {"text": r["text"], "label": ["negative", "positive"][r["label"]]} for r in sentiment_rows(60)]),
        "mc": write_jsonl(root / "colors.jsonl", choice_rows(80)),
        "gen": write_jsonl(root / "plus.jsonl", generation_rows(60)),
    }
    return {"root": root, "encoder": enc, "decoder": dec, **files}


def train(tmp_path, model, task, *extra, name="run"):
    out = tmp_path / name
    code = main(["train", "--model", str(model), "--task", f"jsonl:{task}", "--output-dir", str(out),
                 "--no-progress", "--eval-batch-size", "16", *extra])
    return code, out


def summary(out):
    return json.loads((out / "summary.json").read_text())


def test_encoder_classification_end_to_end(tmp_path, assets, capsys):
    code, out = train(tmp_path, assets["encoder"], assets["cls"], "--method", "tsd", "--r", "4",
                      "--dash-directions", "2", "--prelaunch-steps", "5", "--steps", "60", "--lr", "1e-2",
                      "--batch-size", "8", "--warmup-steps", "5")
    assert code == 0
    s = summary(out)
    assert s["data"]["kind"] == "classification" and s["model"]["kind"] == "encoder"
    assert s["phase"] == "switched" and s["switch_step"] == 5
    assert s["metrics_after"]["test"]["accuracy"] >= 0.9  # the toy task is trivially separable
    assert {"adapter", "peft", "metrics.jsonl", "summary.json", "train_config.json"} <= {p.name for p in out.iterdir()}
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "switch"] == [5]
    assert [e["phase"] for e in events if e["event"] == "step"][3:6] == ["prelaunch", "switched", "switched"]
    printed = capsys.readouterr().out
    assert "untrained" in printed and "outputs in" in printed
    # eval reproduces the final test accuracy of the summary
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["accuracy"] == s["metrics_after"]["test"]["accuracy"]
    # export: the PEFT adapter (with the classification head) loads in stock peft and agrees
    assert main(["export", str(out), "--out", str(tmp_path / "peft")]) == 0
    assert main(["export", str(out), "--out", str(tmp_path / "merged"), "--merged"]) == 0
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets["encoder"])
    batch = tok(["the movie was very good", "the food was awful"], return_tensors="pt", padding=True)
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    base = AutoModelForSequenceClassification.from_pretrained(assets["encoder"], num_labels=2)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    with torch.no_grad():
        assert torch.allclose(merged(**batch).logits, peft_model(**batch).logits, atol=1e-5)


@pytest.mark.parametrize("task_key", ["mc", "cls_named", "gen"])
def test_decoder_tasks_end_to_end(tmp_path, assets, capsys, task_key):
    code, out = train(tmp_path, assets["decoder"], assets[task_key], "--method", "dash", "--r", "4",
                      "--dash-directions", "2", "--prelaunch-steps", "4", "--steps", "12", "--lr", "1e-2",
                      "--batch-size", "8", "--eval-every", "6")
    assert code == 0
    s = summary(out)
    assert s["model"]["kind"] == "decoder" and s["phase"] == "switched"
    metrics = s["metrics_after"]["test"]
    assert 0.0 <= metrics["accuracy"] <= 1.0
    if task_key != "gen":
        assert "accuracy_norm" in metrics
    assert [h["step"] for h in s["validation_history"]] == [6]
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == metrics["accuracy"]


def test_decoder_multiple_choice_learns(tmp_path, assets):
    code, out = train(tmp_path, assets["decoder"], assets["mc"], "--method", "lora", "--r", "4", "--steps", "40",
                      "--lr", "2e-2", "--batch-size", "8", "--warmup-steps", "0")
    assert code == 0
    s = summary(out)
    assert s["metrics_after"]["test"]["accuracy"] > s["metrics_before"]["test"]["accuracy"]
    assert s["metrics_after"]["test"]["accuracy"] == 1.0


def test_config_file_and_flag_override(tmp_path, assets):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {assets['encoder']}\ntask: jsonl:{assets['cls']}\nmethod: lora\nr: 2\nsteps: 3\n"
                   "batch-size: 4\n")
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg), "--steps", "2", "--output-dir", str(out), "--no-progress"]) == 0
    s = summary(out)
    assert s["config"]["r"] == 2 and s["config"]["steps"] == 2 and s["config"]["batch_size"] == 4


def test_bare_base_model_eval(assets, capsys):
    assert main(["eval", "--model", str(assets["decoder"]), "--task", f"jsonl:{assets['mc']}"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["adapter"] is None and 0 <= result["accuracy"] <= 1


def test_hub_id_from_the_local_hf_cache(tmp_path, assets):
    """A Hub id resolves through the standard HF cache layout (what a user with the Hub has after a download)."""
    hub = tmp_path / "hub"
    snap = hub / "models--tiny-org--tiny-llama" / "snapshots" / ("0" * 40)
    shutil.copytree(assets["decoder"], snap)
    (hub / "models--tiny-org--tiny-llama" / "refs").mkdir()
    (hub / "models--tiny-org--tiny-llama" / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "lora_tsd.app.cli", "train", "--model", "tiny-org/tiny-llama", "--task",
           f"jsonl:{assets['mc']}", "--method", "lora", "--r", "2", "--steps", "2", "--output-dir",
           str(tmp_path / "run"), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert summary(tmp_path / "run")["config"]["model"] == "tiny-org/tiny-llama"
    missing = subprocess.run(cmd[:5] + ["tiny-org/not-cached"] + cmd[6:-3] + ["--output-dir", str(tmp_path / "run2")],
                             capture_output=True, text=True, env=env, timeout=300)
    assert missing.returncode == 1
    assert "not in the local Hugging Face cache" in missing.stderr and "local folder" in missing.stderr
    assert not (tmp_path / "run2" / "summary.json").exists()


# ------------------------------------------------------------------------------------------- bad input


def test_existing_output_dir_is_refused(tmp_path, assets, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, _ = train(tmp_path, assets["encoder"], assets["cls"], "--steps", "1")
    assert code == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "keep me"
    code, _ = train(tmp_path, assets["encoder"], assets["cls"], "--steps", "1", "--overwrite")
    assert code == 2 and "not a lora-tsd run folder" in capsys.readouterr().err
    assert (out / "precious.txt").exists()


def test_overwrite_replaces_a_previous_run(tmp_path, assets):
    args = ("--method", "lora", "--r", "2", "--steps", "1", "--batch-size", "4")
    assert train(tmp_path, assets["encoder"], assets["cls"], *args)[0] == 0
    assert train(tmp_path, assets["encoder"], assets["cls"], *args)[0] == 2
    assert train(tmp_path, assets["encoder"], assets["cls"], *args, "--overwrite")[0] == 0


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["train", "--no-such-flag"], 2, "unrecognized arguments: --no-such-flag"),
        (["train", "--model", "no-such-model", "--task", "jsonl:x.jsonl"], 2, "unknown model 'no-such-model'"),
        (["train", "--task", "nosource:thing"], 2, "must start with one of"),
        (["train", "--r", "0"], 2, "r must be a positive integer"),
        (["train", "--method", "qlora"], 2, "unknown method 'qlora'"),
        (["train", "--steps", "0"], 2, "steps must be a positive integer"),
        (["eval"], 2, "give a run folder"),
        (["eval", "/nonexistent/run"], 2, "is not a lora-tsd run folder"),
    ],
)
def test_cli_misuse(tmp_path, capsys, argv, code, message):
    if argv[0] == "train":
        argv = argv + ["--output-dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) if "unrecognized" in message or argv == ["eval"] else _nullcontext() as exc:
        result = main(argv)
    result = exc.value.code if exc is not None and hasattr(exc, "value") else result
    assert result == code
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "summary.json").exists()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_unknown_config_key(tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"rank": 8}))
    assert main(["train", "--config", str(cfg)]) == 2
    assert "unknown key(s) in" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"text": "good", "label": 1}\n{"text": "bad", "label": \n', r"sentiment.jsonl:2: malformed JSON"),
        ('{"input": "q", "choices": ["a", "b"], "label": 2}\n' * 20, "label"),
    ],
)
def test_bad_data_files(tmp_path, assets, capsys, content, message):
    bad = tmp_path / "sentiment.jsonl"
    bad.write_text(content)
    code, out = train(tmp_path, assets["encoder"], bad, "--steps", "1")
    assert code == 1
    err = capsys.readouterr().err
    assert message.replace("\\", "") in err or __import__("re").search(message, err)
    assert not (out / "summary.json").exists()


def test_encoder_on_a_multiple_choice_task_is_refused(tmp_path, assets, capsys):
    code, out = train(tmp_path, assets["encoder"], assets["mc"], "--steps", "1")
    assert code == 2
    assert "encoder models train classification tasks only" in capsys.readouterr().err


def test_dora_baseline_runs_through_the_same_loop(tmp_path, assets, capsys):
    code, out = train(tmp_path, assets["encoder"], assets["cls"], "--method", "dora", "--r", "4", "--steps", "40",
                      "--lr", "1e-2", "--batch-size", "8", "--warmup-steps", "5")
    assert code == 0
    s = summary(out)
    assert s["phase"] == "dora" and s["switch_step"] is None and s["model"]["class"] == "PeftModel"
    assert json.loads((out / "peft" / "adapter_config.json").read_text())["use_dora"] is True
    capsys.readouterr()
    assert main(["eval", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == s["metrics_after"]["test"]["accuracy"]
    assert main(["export", str(out), "--out", str(tmp_path / "merged"), "--merged"]) == 0
    assert main(["export", str(out), "--out", str(tmp_path / "dora-peft")]) == 0
    assert json.loads((tmp_path / "dora-peft" / "adapter_config.json").read_text())["use_dora"] is True
    assert train(tmp_path, assets["encoder"], assets["cls"], "--method", "dora", "--fsdp", name="fsdp")[0] == 2


def test_gradient_estimator_switches_before_training(tmp_path, assets):
    """--init-estimator gradient: the probe ranks by the accumulated full-weight gradient and switches at step 0,
    then training runs in the switched phase; the selected directions are those of the library's probe."""
    code, out = train(tmp_path, assets["encoder"], assets["cls"], "--method", "init", "--r", "4",
                      "--init-estimator", "gradient", "--probe-batches", "3", "--steps", "60", "--lr", "1e-2",
                      "--batch-size", "8", "--warmup-steps", "5", "--dropout", "0")
    assert code == 0
    s = summary(out)
    assert s["phase"] == "switched" and s["switch_step"] == 0
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    switch = [e for e in events if e["event"] == "switch"]
    assert switch == [{"event": "switch", "step": 0, "method": "init", "estimator": "gradient", "probe_batches": 3}]
    assert {e["phase"] for e in events if e["event"] == "step"} == {"switched"}
    assert s["metrics_after"]["test"]["accuracy"] >= 0.9

    # The same directions from the library call on the same first three training batches.
    import lora_tsd
    from lora_tsd.app.workflow.loading import batch_indices, load_for_run
    from lora_tsd.app.workflow.outputs import read_run_config

    cfg = read_run_config(out)
    task, model, _, _, runner = load_for_run(cfg)
    model = lora_tsd.attach(model, cfg.tsd_config(["classifier"]))
    model.train()
    batches = [[task.train[i] for i in batch_indices(len(task.train), cfg.batch_size, cfg.seed, k)] for k in range(3)]
    lora_tsd.gradient_probe(model, batches, lambda m, b: runner.loss(m, b, torch.device("cpu")))
    from safetensors.torch import load_file

    saved = load_file(str(out / "adapter" / "tsd_adapter.safetensors"))
    for name, layer in lora_tsd.adapted_layers(model):
        assert torch.equal(saved[f"{name}.init_idx"], layer.init_idx), name
