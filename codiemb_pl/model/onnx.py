"""ONNX export of an exported (sentence-transformers) folder, and an onnxruntime encoder that reads it.

    codiemb export-onnx runs/x/model            # writes runs/x/model/onnx/model.onnx and onnx/model_qint8.onnx

Layout, sentence-transformers' ONNX backend's: `FOLDER/onnx/model.onnx` is the transformer alone (inputs
`input_ids`, `attention_mask` and, when the model takes it, `token_type_ids`; output `last_hidden_state`
[batch, sequence, d]; batch and sequence dynamic), exported by `torch.onnx.export` (the dynamo exporter);
`FOLDER/onnx/model_qint8.onnx` is the same graph with int8 weights, quantised by onnxruntime's
`quantize_dynamic` (weights int8 once, activations quantised per batch at run time). Pooling, the
prompt rule and normalisation stay those of the folder's modules: `OnnxEncoder` applies them with the same
functions as `TextEncoder`, and sentence-transformers does with `backend="onnx"` (add
`model_kwargs={"file_name": "onnx/model_qint8.onnx"}` for the int8 file) where its optimum dependency installs.
Matryoshka widths are a slice of the output (`truncate_dim`), nothing in the graph.

Needs the `onnx` extra (onnx, onnxruntime, onnxscript). Each file is written to a temporary name and renamed.
"""

from __future__ import annotations

import inspect
import logging
import os
import warnings
from contextlib import redirect_stdout
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from codiemb_pl.errors import InputError
from codiemb_pl.storage.atomic import atomic_file

ONNX_FILE = "onnx/model.onnx"
INT8_FILE = "onnx/model_qint8.onnx"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
SAMPLE_TEXTS = ("a short text", "a somewhat longer text so that the two rows have different lengths")


def require_onnx() -> None:
    """One clear line when the `onnx` extra is missing."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise InputError("codiemb export-onnx", f"the ONNX packages are not installed ({error.name})",
                         "pip install 'codiemb_pl[onnx]' (onnx, onnxruntime, onnxscript)") from None


class _LastHiddenState(torch.nn.Module):
    """The transformer as the exported graph: named inputs in, `last_hidden_state` out."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **extra,
                          return_dict=True).last_hidden_state


def model_input_names(model: torch.nn.Module, tokenized: dict[str, torch.Tensor]) -> list[str]:
    """The graph inputs: those of `INPUT_NAMES` that the tokenizer gives and the model's forward takes."""
    accepted = inspect.signature(model.forward).parameters
    return [name for name in INPUT_NAMES if name in tokenized and name in accepted]


def export_onnx(folder: str | os.PathLike, quantize: bool = True, opset: int = 18) -> list[Path]:
    """Write `onnx/model.onnx` (and, with `quantize`, `onnx/model_qint8.onnx`) into the sentence-transformers folder
    `folder` (module docstring); returns the files written."""
    require_onnx()
    from codiemb_pl.model.encoder import TextEncoder

    root = Path(folder)
    if not (root / "modules.json").is_file():
        raise InputError(str(root), "is not a sentence-transformers folder (no modules.json)",
                         "give a folder written by codiemb fit (ExportEncoder), codiemb fuse or TextEncoder.save")
    encoder = TextEncoder(str(root))
    tokenized = encoder.tokenize(list(SAMPLE_TEXTS))
    names = model_input_names(encoder.model, tokenized)
    graph = _LastHiddenState(encoder.model.eval())
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    shapes = {name: {0: batch, 1: sequence} if name in names else None for name in INPUT_NAMES}
    target = root / ONNX_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    quiet = logging.getLogger("torch.onnx")   # "torchvision is not installed. Skipping ..." lines
    level, quiet.level = quiet.level, logging.ERROR
    with atomic_file(target) as temporary, warnings.catch_warnings(), redirect_stdout(open(os.devnull, "w")):
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, tuple(tokenized[name] for name in names), str(temporary), input_names=names,
                          output_names=["last_hidden_state"], opset_version=opset, dynamo=True,
                          external_data=False, dynamic_shapes=shapes)
    quiet.setLevel(level)
    written = [target]
    if quantize:
        written.append(quantize_onnx(target, root / INT8_FILE))
    return written


def quantize_onnx(source: Path, target: Path) -> Path:
    """`source` with int8 weights, written atomically: onnxruntime's pre-processing (graph optimisation and ONNX
    shape inference, `quant_pre_process`; its symbolic shape inference does not finish on the dynamo exporter's
    graphs, and dynamic quantisation does not need it), then `quantize_dynamic` with signed int8 weights."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with atomic_file(target) as temporary:
        prepared = temporary.with_name(temporary.name + ".prepared.onnx")
        try:
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            quantize_dynamic(str(prepared), str(temporary), weight_type=QuantType.QInt8)
        finally:
            prepared.unlink(missing_ok=True)
    return target


class OnnxEncoder:
    """`TextEncoder.encode` on onnxruntime: the folder's tokenizer, its ONNX transformer (`file_name`), and the same
    pooling (prompt tokens left out when `include_prompt` is False), normalisation and length limit, read through
    `TextEncoder` (whose torch weights are loaded once and dropped)."""

    def __init__(self, folder: str | os.PathLike, file_name: str = ONNX_FILE, threads: int | None = None,
                 max_seq_length: int | None = None):
        require_onnx()
        import onnxruntime

        from codiemb_pl.model.encoder import TextEncoder

        root = Path(folder)
        path = root / file_name
        if not path.is_file():
            raise InputError(str(path), "no such ONNX file", f"run codiemb export-onnx {root} first")
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [node.name for node in self.session.get_inputs()]
        settings = TextEncoder(str(root), max_seq_length=max_seq_length)   # the folder's tokenizer, pooling, prompts, length and normalisation
        del settings.model                   # (its torch transformer is not used: the ONNX graph replaces it)
        self.tokenize, self.tokenizer = settings.tokenize, settings.tokenizer
        self.pooling, self.normalize = settings.pooling, settings.normalize
        self.include_prompt, self.prompts = settings.include_prompt, dict(settings.prompts)
        self.embedding_dim = settings.embedding_dim

    def encode(self, texts: Sequence[str], batch_size: int = 32, prompt: str | None = None,
               truncate_dim: int | None = None) -> np.ndarray:
        """float32 `[n, d]` (or `[n, truncate_dim]`: the first dimensions, as sentence-transformers truncates)."""
        from codiemb_pl.model.pooling import leading_special_tokens, pool, prefix_pooling_mask, prefix_token_count

        texts = [(prompt or "") + text for text in texts]
        excluded = prefix_token_count(self.tokenizer, prompt) if prompt and not self.include_prompt else 0
        leading = leading_special_tokens(self.tokenizer) if excluded else 0
        order = sorted(range(len(texts)), key=lambda index: -len(texts[index]))
        out = np.empty((len(texts), self.embedding_dim), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            rows = order[start:start + batch_size]
            features = self.tokenize([texts[index] for index in rows])
            feeds = {name: features[name].numpy().astype(np.int64) for name in self.input_names}
            states = torch.from_numpy(self.session.run(None, feeds)[0])
            mask = features["attention_mask"]
            if excluded and self.pooling == "mean":
                mask = prefix_pooling_mask(mask, [excluded] * len(rows), leading)
            embeddings = pool(states, mask, self.pooling)
            if self.normalize:
                embeddings = F.normalize(embeddings, p=2, dim=-1)
            out[rows] = embeddings.numpy()
        return out[:, :truncate_dim] if truncate_dim else out

    def __repr__(self) -> str:
        return f"OnnxEncoder({self.session._model_path!r}, pooling={self.pooling!r}, normalize={self.normalize})"
