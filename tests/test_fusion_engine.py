"""The merge engine: row slices equal whole tensors for every method, declared needs are honoured,
sources read what they hold, and the safetensors writer is atomic."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from codiemb_pl.errors import InputError
from codiemb_pl.fusion import methods
from codiemb_pl.fusion.engine import Merge, merge_state_dicts, merge_to_safetensors
from codiemb_pl.fusion.methods import MERGE_METHODS, DeltaNorms, Needs, TrimThresholds, merge_needs, trim_to_density
from codiemb_pl.fusion.sources import MappingSource, SafetensorsSource, as_source
from codiemb_pl.fusion.writer import save_state_dict, write_safetensors

# Parameters for every registered method (a new method must be added here: the test below fails otherwise).
METHOD_PARAMS = {
    "uniform_soup": [{}], "task_arithmetic": [{"scale": 0.7}], "dare": [{"drop_rate": 0.3}],
    "ties": [{"density": 0.25}, {"density": 1.0}], "multi_slerp": [{}], "slerp": [{"t": 0.3}],
    "delta_guided": [{"gamma": 2.0}, {"granularity": "row"}, {"granularity": "tensor"}, {"granularity": "layer"}],
}


def family(count: int = 3, seed: int = 0) -> tuple[dict, list[dict]]:
    generator = torch.Generator().manual_seed(seed)
    base = {"emb.weight": torch.randn(37, 6, generator=generator),
            "enc.layer.0.w": torch.randn(9, 4, generator=generator),
            "enc.layer.0.b": torch.randn(4, generator=generator),
            "scale": torch.tensor(1.5), "ids": torch.arange(4), "emb.position_ids": torch.arange(5.0)}
    models = [{k: v + 0.1 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v + index
               for k, v in base.items()} for index in range(count)]
    return base, models


def test_every_registered_method_has_test_parameters():
    assert set(METHOD_PARAMS) == set(MERGE_METHODS)


@pytest.mark.parametrize("method, params", [(m, p) for m, plist in METHOD_PARAMS.items() for p in plist])
def test_row_slices_equal_whole_tensors(method, params):
    base, models = family(2 if method == "slerp" else 3)
    whole = Merge(base, models, method, params, seed=4, max_elements=None)
    sliced = Merge(base, models, method, params, seed=4, max_elements=12)
    for key in base:
        expected, got = whole.tensor(key), sliced.tensor(key)
        assert got.dtype == expected.dtype and got.shape == expected.shape, key
        if params.get("granularity") in ("tensor", "layer"):   # norms summed in another order: float rounding
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(got, expected), (method, params, key)
    pieces = list(sliced.slices("emb.weight"))
    assert len(pieces) == (19 if merge_needs(method, params).sliceable else 1)   # 37 rows of 6: 2 rows a slice


def test_declared_needs():
    assert merge_needs("uniform_soup", {}) == Needs(sliceable=True)
    assert merge_needs("dare", {"drop_rate": 0.1}) == Needs() and merge_needs("multi_slerp", {}) == Needs()
    assert merge_needs("ties", {"density": 0.3}) == Needs(True, TrimThresholds(0.3))
    assert merge_needs("ties", {"density": 1.0}) == Needs(True) and merge_needs("ties", {}).statistic.density == 0.2
    assert merge_needs("delta_guided", {"granularity": "tensor"}) == Needs(True, DeltaNorms("tensor"))
    assert merge_needs("delta_guided", {"granularity": "layer"}) == Needs(True, DeltaNorms("layer"))
    assert merge_needs("delta_guided", {}) == Needs(True)
    with pytest.raises(InputError, match="unknown merge method"):
        merge_needs("frankenmerge", {})
    assert methods.method_parameters("ties") == ("density", "scale")
    assert methods.method_parameters("delta_guided") == ("gamma", "scale", "granularity")


def test_a_method_registered_without_needs_gets_whole_tensors(monkeypatch):
    monkeypatch.setitem(MERGE_METHODS, "plain_dict_entry", methods.uniform_soup)
    assert merge_needs("plain_dict_entry", {}) == Needs()
    base, models = family()
    merged = Merge(base, models, "plain_dict_entry", max_elements=12)
    assert len(list(merged.slices("emb.weight"))) == 1


def _recording_method(monkeypatch, name: str, needs) -> list[dict]:
    """Register `name`: θ0 + mean Δ, recording the shape of each call and the statistic it was given."""
    calls: list[dict] = []

    def record(base, deltas, *, weights=None, generator=None, magnitudes=None, thresholds=None):
        calls.append({"shape": tuple(base.shape), "magnitudes": magnitudes, "thresholds": thresholds,
                      "generator": generator})
        return (base + sum(deltas) / len(deltas)).to(base.dtype)

    monkeypatch.setitem(MERGE_METHODS, name, record)
    monkeypatch.setitem(methods.MERGE_NEEDS, name, lambda params: needs)
    return calls


def test_a_whole_tensor_method_gets_whole_tensors(monkeypatch):
    calls = _recording_method(monkeypatch, "whole_probe", Needs())
    base, models = family()
    merged = Merge(base, models, "whole_probe", max_elements=12).state_dict()
    assert sorted(c["shape"] for c in calls) == sorted(tuple(base[k].shape) for k in ("emb.weight", "enc.layer.0.w",
                                                                                     "enc.layer.0.b", "scale"))
    assert all(c["generator"] is not None and c["magnitudes"] is None and c["thresholds"] is None for c in calls)
    assert torch.equal(merged["ids"], models[0]["ids"]) and torch.equal(merged["emb.position_ids"],
                                                                        models[0]["emb.position_ids"])


def test_a_sliceable_method_gets_row_slices_and_its_tensor_statistic(monkeypatch):
    calls = _recording_method(monkeypatch, "trim_probe", Needs(True, TrimThresholds(0.25)))
    base, models = family()
    merged = Merge(base, models, "trim_probe", max_elements=12).state_dict()
    embedding_calls = [c for c in calls if c["shape"][1:] == (6,)]
    assert [c["shape"][0] for c in embedding_calls] == [2] * 18 + [1]
    delta = (models[1]["emb.weight"] - base["emb.weight"]).abs().reshape(-1)
    keep = math.ceil(0.25 * delta.numel())
    assert embedding_calls[0]["thresholds"][1] == float(torch.kthvalue(delta, delta.numel() - keep + 1).values)
    assert all(c["thresholds"] == embedding_calls[0]["thresholds"] for c in embedding_calls)
    assert all(c["generator"] is None for c in calls if c["shape"])
    expected = base["emb.weight"] + sum(m["emb.weight"] - base["emb.weight"] for m in models) / 3
    torch.testing.assert_close(merged["emb.weight"], expected)


def test_layer_norms_come_from_a_first_pass_over_the_whole_layer(monkeypatch):
    calls = _recording_method(monkeypatch, "layer_probe", Needs(True, DeltaNorms("layer")))
    base, models = family()
    Merge(base, models, "layer_probe", max_elements=12).state_dict()
    expected = [math.sqrt(sum(float(((m[k] - base[k]).double() ** 2).sum()) for k in ("enc.layer.0.w", "enc.layer.0.b")))
                for m in models]
    layer_calls = [c for c in calls if c["shape"] in ((9, 4), (3, 4), (4,))]
    assert layer_calls and all(c["magnitudes"] == pytest.approx(expected, rel=1e-12) for c in layer_calls)


def test_tensor_norms_are_the_norms_of_the_whole_tensor(monkeypatch):
    calls = _recording_method(monkeypatch, "norm_probe", Needs(True, DeltaNorms("tensor")))
    base, models = family()
    Merge(base, models, "norm_probe", max_elements=12).state_dict()
    expected = [float((m["emb.weight"] - base["emb.weight"]).double().norm()) for m in models]
    embedding_calls = [c for c in calls if c["shape"][1:] == (6,)]
    assert len(embedding_calls) == 19
    assert all(c["magnitudes"] == pytest.approx(expected, rel=1e-12) for c in embedding_calls)


def test_ties_thresholds_reproduce_the_trim():
    base, models = family()
    deltas = [m["emb.weight"] - base["emb.weight"] for m in models]
    thresholds = []
    for delta in deltas:
        magnitude = delta.abs().reshape(-1)
        keep = math.ceil(0.3 * magnitude.numel())
        thresholds.append(float(torch.kthvalue(magnitude, magnitude.numel() - keep + 1).values))
    assert all(torch.equal(trim_to_density(d, 0.3), torch.where(d.abs() >= t, d, torch.zeros_like(d)))
               for d, t in zip(deltas, thresholds))
    given = methods.ties(base["emb.weight"], deltas, density=0.3, thresholds=thresholds)
    assert torch.equal(given, methods.ties(base["emb.weight"], deltas, density=0.3))
    with pytest.raises(InputError, match="2 thresholds for 3 checkpoints"):
        methods.ties(base["emb.weight"], deltas, density=0.3, thresholds=thresholds[:2])


def test_statistics_are_not_user_parameters():
    base, models = family()
    with pytest.raises(InputError, match="`thresholds` is computed by the merge engine"):
        Merge(base, models, "ties", {"thresholds": [0.1, 0.1, 0.1]})
    with pytest.raises(InputError, match="`magnitudes` is computed by the merge engine"):
        merge_state_dicts(base, models, "delta_guided", {"granularity": "layer", "magnitudes": [1, 1, 1]})


def test_sources_read_rows_shapes_and_dtypes(tmp_path):
    state = {"w": torch.randn(7, 3), "h": torch.randn(5).to(torch.bfloat16), "s": torch.tensor(2.0),
             "i": torch.arange(6, dtype=torch.int32), "e": torch.zeros(0, 4)}
    save_file(state, str(tmp_path / "m.safetensors"))
    for source in (SafetensorsSource(tmp_path / "m.safetensors"), MappingSource(state), as_source(tmp_path, "m"),
                   as_source(str(tmp_path / "m.safetensors"), "m")):
        assert sorted(source.keys()) == sorted(state)
        for key, tensor in state.items():
            assert source.shape(key) == tuple(tensor.shape) and source.dtype(key) == tensor.dtype
            assert torch.equal(source.get(key), tensor)
        assert torch.equal(source.rows("w", 2, 5), state["w"][2:5]) and torch.equal(source.rows("s", 0, 1), state["s"])
    with pytest.raises(InputError, match="no .safetensors file"):
        SafetensorsSource(tmp_path / "missing")


def test_merge_to_safetensors_equals_the_in_memory_merge(tmp_path):
    base, models = family()
    paths = []
    for index, state in enumerate([base] + models):
        paths.append(tmp_path / f"c{index}.safetensors")
        save_file(state, str(paths[-1]))
    for method, params in [("ties", {"density": 0.4}), ("dare", {"drop_rate": 0.2}), ("delta_guided", {})]:
        out = merge_to_safetensors(paths[0], paths[1:], method, params, tmp_path / "out" / f"{method}.safetensors",
                                   seed=3, max_elements=12, metadata={"note": "x"})
        written = load_file(str(out))
        expected = merge_state_dicts(base, models, method, params, seed=3)
        assert set(written) == set(expected)
        assert all(torch.equal(written[k], expected[k]) for k in expected), method


def test_writer_is_atomic_and_refuses_short_pieces(tmp_path):
    target = tmp_path / "model.safetensors"
    save_state_dict({"old": torch.ones(2)}, target)
    layout = {"a": (torch.float32, (4, 2)), "b": (torch.float32, (3,))}

    def failing(key):
        yield torch.zeros(2, 2)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_safetensors(target, layout, failing)
    with pytest.raises(RuntimeError, match="wrote 8 bytes, expected 32"):
        write_safetensors(target, layout, lambda key: [torch.zeros(1, 2)])
    assert list(tmp_path.iterdir()) == [target] and torch.equal(load_file(str(target))["old"], torch.ones(2))
    pieces = {"a": [torch.arange(4.0).reshape(2, 2), torch.arange(4.0, 8.0).reshape(2, 2)], "b": [torch.ones(3)]}
    write_safetensors(target, layout, lambda key: pieces[key], metadata={"method": "test"})
    loaded = load_file(str(target))
    assert torch.equal(loaded["a"], torch.arange(8.0).reshape(4, 2)) and torch.equal(loaded["b"], torch.ones(3))
    assert "old" not in loaded and oct(target.stat().st_mode & 0o777) == "0o644"
    from safetensors import safe_open
    with safe_open(str(target), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "method": "test"}


def test_writer_round_trips_every_dtype(tmp_path):
    state = {"f64": torch.randn(2, dtype=torch.float64), "bf16": torch.randn(3).to(torch.bfloat16),
             "f16": torch.randn(2, 2).to(torch.float16), "i64": torch.arange(3), "b": torch.tensor([True, False]),
             "u8": torch.arange(4, dtype=torch.uint8), "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 3)}
    save_state_dict(state, tmp_path / "x.safetensors")
    loaded = load_file(str(tmp_path / "x.safetensors"))
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in state.items())
    with pytest.raises(InputError, match="cannot be stored in safetensors"):
        save_state_dict({"c": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "c.safetensors")
    assert not (tmp_path / "c.safetensors").exists()


def test_the_fusion_library_imports_neither_lightning_nor_the_cli():
    import subprocess
    import sys

    code = ("import pkgutil, importlib, sys, codiemb_pl.fusion as f\n"
            "for info in pkgutil.iter_modules(f.__path__): importlib.import_module(f'codiemb_pl.fusion.{info.name}')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')\n"
            "             or m.startswith(('codiemb_pl.cli.main', 'codiemb_pl.commands', 'codiemb_pl.callbacks',\n"
            "                              'codiemb_pl.workflows', 'codiemb_pl.training.module'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
