"""``lora-tsd dreambooth`` and ``lora-tsd export --format diffusers`` from the command line on a tiny pipeline folder:
the end-to-end path of the issue, the complete ``--help``, and bad input (one-line error, exit code, nothing left)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_diffusion import unet_output
from tiny_diffusion import make_images, make_pipeline

from lora_tsd import load_adapter
from lora_tsd.adapter_io import TENSORS_FILE
from lora_tsd.app.cli import main
from lora_tsd.app.cli.options import train_options
from lora_tsd.app.diffusion.config import DreamBoothConfig


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("diffusion_cli")
    return {"pipeline": make_pipeline(root), "images": make_images(root / "images")}


def dreambooth_args(assets: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["dreambooth", "--model", str(assets["pipeline"]), "--images", str(assets["images"]),
            "--prompt", "a photo of sks dog", "--resolution", "32", "--steps", "4", "--rank", "2",
            "--dash-directions", "2", "--prelaunch-steps", "2", "--lr", "1e-2", "--samples", "1",
            "--sample-steps", "2", "--output-dir", str(out), "--no-progress", *extra]


def test_dreambooth_dash_then_export_loads_with_load_lora_weights(assets, tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    run = tmp_path / "run"
    assert main(dreambooth_args(assets, run, "--method", "dash", "--checkpoint-every", "2")) == 0
    assert {"adapter", "samples.png", "summary.json", "dreambooth_config.json"} <= {p.name for p in run.iterdir()}
    # --resume from the step-2 checkpoint (after the switch) rewrites the same adapter bit for bit.
    adapter = load_file(str(run / "adapter" / TENSORS_FILE))
    shutil.rmtree(run / "checkpoints" / "step-0000004")
    shutil.rmtree(run / "adapter")
    assert main(["dreambooth", "--output-dir", str(run), "--resume", "--no-progress"]) == 0
    resumed = load_file(str(run / "adapter" / TENSORS_FILE))
    assert resumed.keys() == adapter.keys() and all(torch.equal(resumed[k], adapter[k]) for k in adapter)
    assert main(["export", str(run), "--format", "diffusers", "--out", str(tmp_path / "lora")]) == 0
    assert "diffusers LoRA" in capsys.readouterr().out
    pipe = StableDiffusionPipeline.from_pretrained(str(assets["pipeline"]), safety_checker=None)
    base = unet_output(pipe.unet)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    own = load_adapter(StableDiffusionPipeline.from_pretrained(str(assets["pipeline"]), safety_checker=None).unet,
                       run / "adapter")
    assert (unet_output(pipe.unet) - unet_output(own)).abs().max().item() <= 1e-4
    assert (unet_output(pipe.unet) - base).abs().max().item() > 1e-3
    # A dreambooth run exports in diffusers' format without --format; an existing folder is never replaced.
    assert main(["export", str(run), "--out", str(tmp_path / "lora")]) == 2
    assert "already exists" in capsys.readouterr().err


def test_dreambooth_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["dreambooth", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for spec in train_options(DreamBoothConfig):
        assert spec.flag in text, spec.flag
    for flag in ("--config", "--resume", "--rank", "load_lora_weights"):
        assert flag in text
    assert "(default: the attention projections to_q to_k to_v to_out.0;" in " ".join(text.split())
    assert "--method METHOD lora, dash (LoRA-Dash)" in " ".join(text.split())
    assert "(default: dash)" in " ".join(text.split())


def _write_broken_image(folder: Path) -> Path:
    folder.mkdir()
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


BAD_INPUT = [
    ("no-images", lambda a, t: ["--images", str(_mkdir(t / "empty"))], 1, "holds no images"),
    ("unreadable-image", lambda a, t: ["--images", str(_write_broken_image(t / "bad"))], 1, "cannot read image"),
    ("images-not-a-folder", lambda a, t: ["--images", str(t / "missing")], 1, "is not a folder"),
    ("not-a-pipeline", lambda a, t: ["--model", str(a["images"])], 1,
     "is not a diffusers pipeline folder (no model_index.json)"),
    ("class-images-without-prompt", lambda a, t: ["--class-images", str(a["images"])], 2,
     "prior preservation needs both --class-images and --class-prompt"),
    ("dora", lambda a, t: ["--method", "dora"], 2, "dreambooth trains the lora-tsd methods"),
    ("bad-resolution", lambda a, t: ["--resolution", "30"], 2, "resolution must be a multiple of 8"),
]


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


@pytest.mark.parametrize("case, extra, code, message", BAD_INPUT, ids=[c[0] for c in BAD_INPUT])
def test_bad_input_gets_one_line_error_and_leaves_nothing(assets, tmp_path, capsys, case, extra, code, message):
    out = tmp_path / "o"
    assert main(dreambooth_args(assets, out, *extra(assets, tmp_path))) == code
    err = capsys.readouterr().err  # diffusers' own loading progress may come before the error line
    assert err.strip().splitlines()[-1].startswith("lora-tsd dreambooth: error: "), err
    assert message in err.strip().splitlines()[-1], err
    assert "Traceback" not in err
    assert not out.exists()


def test_missing_required_options_and_wrong_run_kind(assets, tmp_path, capsys):
    assert main(["dreambooth", "--images", str(assets["images"]), "--prompt", "p"]) == 2
    assert "--model is required" in capsys.readouterr().err
    plain = _mkdir(tmp_path / "plain")
    assert main(["export", str(plain), "--format", "diffusers", "--out", str(tmp_path / "x")]) == 2
    assert "is not a dreambooth run folder" in capsys.readouterr().err
    assert main(["dreambooth", "--output-dir", str(plain), "--resume"]) == 2
    assert "is not a dreambooth run folder" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
