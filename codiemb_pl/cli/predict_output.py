"""The output of `codiemb predict`: one float32 embedding per input text, row i = text i, written atomically
(a reader sees the previous file or the complete new one, never a partial one).

`.npy`: an `(n_texts, dim)` float32 matrix (`numpy.load`). `.parquet`: columns `text` (string) and
`embedding` (fixed-size list of float32), e.g. `pandas.read_parquet` / `datasets.load_dataset("parquet", ...)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from codiemb_pl.errors import InputError
from codiemb_pl.storage.atomic import atomic_file
from codiemb_pl.storage.output_paths import check_writable_file

OUTPUT_SUFFIXES = (".npy", ".parquet")


def check_output_path(path: Optional[str], option: str = "--predict_output") -> Path:
    """The output path, refused before any work if it is missing, a folder, of an unknown kind, or in a folder
    that cannot be written."""
    if not path:
        raise InputError(option, "no output file given", f"pass {option} FILE.npy or FILE.parquet")
    target = Path(path)
    if target.suffix.lower() not in OUTPUT_SUFFIXES:
        raise InputError(f"{option} {path}", f"unknown output kind {target.suffix or '(no extension)'!r}",
                         f"end the file name with {' or '.join(OUTPUT_SUFFIXES)}")
    return check_writable_file(target, option)


def write_embeddings(path: str | Path, embeddings: np.ndarray, texts: list[str]) -> Path:
    """Write `embeddings` (`(len(texts), dim)`) to `path` (.npy or .parquet), atomically."""
    target = check_output_path(str(path))
    matrix = np.ascontiguousarray(embeddings, dtype=np.float32)
    if matrix.ndim != 2 or matrix.shape[0] != len(texts):
        raise ValueError(f"expected {len(texts)} embeddings, got an array of shape {matrix.shape}")
    with atomic_file(target) as temporary:
        if target.suffix.lower() == ".npy":
            with open(temporary, "wb") as handle:
                np.save(handle, matrix)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            vectors = pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])
            pq.write_table(pa.table({"text": pa.array(texts, pa.string()), "embedding": vectors}), temporary)
    return target
