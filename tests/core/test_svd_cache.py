"""The on-disk SVD cache: hits return the stored tensors, changed weights miss, damaged files are recomputed."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lora_tsd import svd_cache
from lora_tsd.directions import thin_svd
from lora_tsd.svd_cache import cached_thin_svd, svd_cache_path


def _weight(seed: int = 0, shape: tuple[int, int] = (24, 16), dtype: torch.dtype = torch.float32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype)


def _count_svds(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Patch the module's thin_svd so a test can count the decompositions it performs."""
    calls: list[int] = []

    def counting(weight: torch.Tensor):  # noqa: ANN202
        calls.append(1)
        return thin_svd(weight)

    monkeypatch.setattr(svd_cache, "thin_svd", counting)
    return calls


def test_no_cache_dir_is_plain_thin_svd(tmp_path: Path) -> None:
    w = _weight()
    got, ref = cached_thin_svd(w, None), thin_svd(w)
    for a, b in zip(got, ref, strict=True):
        assert torch.equal(a, b)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("shape", [(24, 16), (16, 24)])
def test_hit_returns_identical_tensors(tmp_path: Path, shape: tuple[int, int],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_svds(monkeypatch)
    w = _weight(shape=shape)
    first = cached_thin_svd(w, tmp_path)
    path = svd_cache_path(w, tmp_path)
    assert path.parent == tmp_path / "svd" and path.suffix == ".safetensors" and path.exists()
    second = cached_thin_svd(w.clone(), tmp_path)  # same content, another tensor: a hit
    assert len(calls) == 1
    k = min(shape)
    assert second.U.shape == (shape[0], k) and second.S.shape == (k,) and second.Vh.shape == (k, shape[1])
    for a, b, c in zip(first, second, thin_svd(w), strict=True):
        assert a.dtype == b.dtype == torch.float32
        assert torch.equal(a, b)
        assert torch.equal(a, c)
    assert not list(path.parent.glob("*.tmp"))  # atomic write left no temporary file


def test_changed_weight_misses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _count_svds(monkeypatch)
    w = _weight()
    cached_thin_svd(w, tmp_path)
    w2 = w.clone()
    w2[3, 5] += 1e-6  # one element
    out = cached_thin_svd(w2, tmp_path)
    assert len(calls) == 2
    assert svd_cache_path(w, tmp_path) != svd_cache_path(w2, tmp_path)
    assert len(list((tmp_path / "svd").glob("*.safetensors"))) == 2
    assert torch.allclose(out.U @ torch.diag(out.S) @ out.Vh, w2, atol=1e-5)


def test_dtype_and_layout_are_part_of_the_key(tmp_path: Path) -> None:
    w = _weight(shape=(16, 16))
    keys = {svd_cache_path(t, tmp_path) for t in (w, w.to(torch.bfloat16), w.T.contiguous(), w.double())}
    assert len(keys) == 4


def test_bf16_weight_is_decomposed_in_fp32(tmp_path: Path) -> None:
    w = _weight(dtype=torch.bfloat16)
    a, b = cached_thin_svd(w, tmp_path), cached_thin_svd(w, tmp_path)
    assert all(t.dtype == torch.float32 for t in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "wrong_shape", "missing_key", "nan"])
def test_corrupt_file_is_ignored_and_recomputed(tmp_path: Path, damage: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    w = _weight()
    ref = cached_thin_svd(w, tmp_path)
    path = svd_cache_path(w, tmp_path)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x00\xff not a safetensors file" * 10)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "wrong_shape":
        save_file({"U": torch.zeros(3, 3), "S": torch.zeros(3), "Vh": torch.zeros(3, 3)}, str(path))
    elif damage == "missing_key":
        save_file({"U": ref.U.contiguous(), "S": ref.S.contiguous()}, str(path))
    else:
        save_file({"U": ref.U.contiguous(), "S": torch.full_like(ref.S, float("nan")), "Vh": ref.Vh.contiguous()},
                  str(path))
    calls = _count_svds(monkeypatch)
    with pytest.warns(UserWarning, match="SVD cache file"):
        out = cached_thin_svd(w, tmp_path)
    assert len(calls) == 1
    assert all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))
    # The damaged entry was rewritten: the next call is a clean hit.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = cached_thin_svd(w, tmp_path)
    assert len(calls) == 1
    assert all(torch.equal(a, b) for a, b in zip(again, ref, strict=True))


def test_unwritable_cache_warns_and_still_returns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(path, write):  # noqa: ANN001, ANN202
        raise OSError("read-only file system")

    monkeypatch.setattr(svd_cache, "atomic_write", fail)
    w = _weight()
    with pytest.warns(UserWarning, match="could not write"):
        out = cached_thin_svd(w, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(out, thin_svd(w), strict=True))
