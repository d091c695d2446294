"""The architecture holds: the import contract of pyproject.toml (import-linter), no import cycle anywhere in the
package, and the core library working with only torch, safetensors and numpy importable."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import grimp
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(cwd: Path, src: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(src)}
    return subprocess.run([str(LINT_IMPORTS), "--config", str(cwd / "pyproject.toml"), "--no-cache"], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def test_import_contracts_are_kept():
    proc = _lint(ROOT, ROOT / "src")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "BROKEN" not in proc.stdout and "Contracts: 4 kept, 0 broken." in proc.stdout


def test_the_contract_fails_on_a_core_module_that_imports_the_application(tmp_path):
    """The contract can fail: a copy of the package whose core math imports the command line breaks it."""
    shutil.copytree(ROOT / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    directions = tmp_path / "src" / "lora_tsd" / "directions.py"
    directions.write_text(directions.read_text() + "\nfrom lora_tsd.app.cli import main  # noqa\n")
    proc = _lint(tmp_path, tmp_path / "src")
    assert proc.returncode != 0
    assert "core layers, with the application on top BROKEN" in proc.stdout
    assert "lora_tsd.directions -> lora_tsd.app.cli" in proc.stdout


def test_every_core_module_is_under_the_contracts():
    """A new core module cannot slip past the contracts: each one is a layer of the core contract and a source of
    the "only torch, safetensors and numpy" contract (trainer_callback aside: it is the transformers integration)."""
    import tomllib

    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    layered = {name.strip() for c in contracts if c.get("containers") == ["lora_tsd"]
               for layer in c["layers"] for name in layer.split("|")}
    forbidden = {m.removeprefix("lora_tsd.") for c in contracts if c["type"] == "forbidden"
                 for m in c["source_modules"]}
    modules = {p.stem for p in (ROOT / "src" / "lora_tsd").glob("*.py") if p.stem != "__init__"}
    assert modules - layered == set(), "core modules missing from the layers contract"
    assert modules - forbidden == {"trainer_callback"}, "core modules missing from the dependency contract"


def test_no_import_cycles():
    """No module reaches itself through imports (the package __init__ files included)."""
    graph = grimp.build_graph("lora_tsd", exclude_type_checking_imports=True)  # annotations are not imports at run time
    cycles = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            chain = graph.find_shortest_chain(importer=imported, imported=importer)
            if chain:
                cycles.append(" -> ".join((importer, *chain)))
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


CORE_ONLY = textwrap.dedent("""
    import sys
    import json, tempfile
    from pathlib import Path
    import torch
    from torch import nn
    import lora_tsd

    from safetensors.torch import load_file

    def plain_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))

    model = plain_model()
    x, y = torch.randn(64, 24), torch.randint(0, 4, (64,))
    before = model(x).detach()
    cfg = lora_tsd.TSDConfig(method="dash", r=2, dash_directions=2, prelaunch_steps=3, target_modules=["0", "2"])
    lora_tsd.attach(model, cfg)
    assert torch.equal(model(x), before)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    switched = []
    for _ in range(6):
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step(); opt.zero_grad()
        switched.append(lora_tsd.step(model, opt))
    assert switched == [False, False, True, False, False, False]
    out = Path(tempfile.mkdtemp())
    lora_tsd.save_adapter(model, out / "adapter")
    lora_tsd.export_peft(model, out / "peft")
    trained = model(x).detach()
    assert json.loads((out / "peft" / "adapter_config.json").read_text())["r"] == 4  # rank r + s
    # export_peft writes PEFT's own files without peft installed: lora_A/lora_B of both adapted layers
    assert sorted(load_file(out / "peft" / "adapter_model.safetensors")) == [
        f"base_model.model.{i}.lora_{ab}.weight" for i in (0, 2) for ab in "AB"]
    # the saved adapter, loaded onto a fresh copy of the base model, reproduces the trained outputs
    reloaded = lora_tsd.load_adapter(plain_model(), out / "adapter")
    assert torch.equal(reloaded(x), trained)
    lora_tsd.merge(model)
    assert not lora_tsd.adapted_layers(model)
    assert (model(x) - trained).abs().max() < 1e-5
    assert not [m for m in sys.modules if m.startswith("lora_tsd.app")]
    print("core-only ok")
""")


CORE_DEPENDENCIES = ("torch", "safetensors", "numpy")


def _distribution_closure(names: tuple[str, ...]) -> set[str]:
    """The installed distributions ``names`` need, with their own requirements (extras and markers honoured)."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        for text in metadata.distribution(name).requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return seen


def _site_with_only(names: tuple[str, ...], folder: Path) -> Path:
    """A folder of links to the top-level modules of ``names`` and their requirements: a site-packages that holds
    nothing else, as a fresh virtual environment with only those packages installed would."""
    folder.mkdir()
    for dist_name in _distribution_closure(names):
        dist = metadata.distribution(dist_name)
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            source = Path(str(dist.locate_file(top)))
            if source.exists() and not (folder / top).exists():
                (folder / top).symlink_to(source)
    return folder


def test_the_core_works_with_only_torch_safetensors_and_numpy(tmp_path):
    """attach -> optimizer steps -> dash switch -> save_adapter -> export_peft -> merge, in an interpreter whose
    only third-party packages are torch, safetensors, numpy and what they require (``python -S``: no site)."""
    site = _site_with_only(CORE_DEPENDENCIES, tmp_path / "site")
    assert not (site / "transformers").exists() and (site / "torch").exists()
    proc = subprocess.run([sys.executable, "-S", "-c", CORE_ONLY], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT / "src")])})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "core-only ok" in proc.stdout
    for name in ("transformers", "peft", "accelerate", "yaml"):  # the test can fail: nothing else is importable
        blocked = subprocess.run([sys.executable, "-S", "-c", f"import {name}"], capture_output=True, text=True,
                                 env={**os.environ, "PYTHONPATH": str(site)})
        assert blocked.returncode != 0, name
