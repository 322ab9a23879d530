"""`codiemb export-onnx` (`model.onnx`): the float32 graph gives the PyTorch embeddings (≤ 1e-4) at full width and
at a Matryoshka width, the int8 graph stays close, the files sit where sentence-transformers' ONNX backend looks,
and bad input is one line."""

from __future__ import annotations

import numpy as np
import pytest

from codiemb_pl.cli.main import main

pytest.importorskip("onnxruntime", reason="the `onnx` extra is not installed")
pytest.importorskip("onnxscript", reason="the `onnx` extra is not installed")

TEXTS = ["A man is playing a guitar.", "how do I blanch vegetables?", "short",
         "The stock market fell sharply on Monday after the announcement of the new tariffs on steel imports."]


@pytest.fixture(scope="module")
def exported(tiny_model_dir, tmp_path_factory):
    from codiemb_pl.model.encoder import TextEncoder

    folder = tmp_path_factory.mktemp("onnx") / "model"
    encoder = TextEncoder(str(tiny_model_dir), include_prompt=False)
    encoder.matryoshka_dims = [32, 16]
    encoder.save(folder)
    assert main(["export-onnx", str(folder)]) == 0
    return folder


def test_float32_onnx_equals_pytorch(exported):
    from codiemb_pl.model.encoder import TextEncoder
    from codiemb_pl.model.onnx import OnnxEncoder

    assert (exported / "onnx" / "model.onnx").is_file() and (exported / "onnx" / "model_qint8.onnx").is_file()
    assert not [p for p in (exported / "onnx").iterdir() if p.name.startswith(".")]   # no temporaries left
    torch_encoder, onnx_encoder = TextEncoder(str(exported)), OnnxEncoder(exported)
    reference = torch_encoder.encode(TEXTS).numpy()
    np.testing.assert_allclose(onnx_encoder.encode(TEXTS, batch_size=3), reference, rtol=0, atol=1e-4)
    np.testing.assert_allclose(onnx_encoder.encode(TEXTS, truncate_dim=16), reference[:, :16], rtol=0, atol=1e-4)
    prompted = torch_encoder.encode(TEXTS, prompt="query: ").numpy()   # include_prompt False: left out of pooling
    np.testing.assert_allclose(onnx_encoder.encode(TEXTS, prompt="query: "), prompted, rtol=0, atol=1e-4)
    assert not np.allclose(prompted, reference, atol=1e-3)


def test_int8_onnx_stays_close(exported):
    from codiemb_pl.model.onnx import INT8_FILE, OnnxEncoder

    full = OnnxEncoder(exported).encode(TEXTS)
    int8 = OnnxEncoder(exported, INT8_FILE).encode(TEXTS)
    cosine = (full * int8).sum(axis=1)
    assert cosine.min() > 0.95 and not np.allclose(full, int8, atol=1e-6)   # quantised, not a copy


def test_bad_folder_is_one_line(tmp_path, capsys):
    assert main(["export-onnx", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("codiemb: error:") == 1 and "is not a sentence-transformers folder" in err and "Traceback" not in err
