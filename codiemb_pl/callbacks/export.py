"""Export the trained encoder as a sentence-transformers folder when `fit` ends.

With `from_best=True` and a ModelCheckpoint that monitors a metric, the best checkpoint's weights are
loaded before export; otherwise the final weights are exported. The folder is written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info


class ExportEncoder(pl.Callback):
    """Write the encoder to `dirpath` (sentence-transformers layout) at the end of `fit`.

    Args:
        dirpath: output folder (replaced atomically).
        from_best: export the best checkpoint of the trainer's ModelCheckpoint when one exists.
    """

    def __init__(self, dirpath: str = "outputs/model", from_best: bool = True):
        self.dirpath = dirpath
        self.from_best = from_best
        self.exported_from: Optional[str] = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        best = getattr(trainer.checkpoint_callback, "best_model_path", "") if trainer.checkpoint_callback else ""
        if self.from_best and best and os.path.exists(best):
            state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
            pl_module.load_state_dict(state)
            self.exported_from = best
        else:
            self.exported_from = "final weights"
        if trainer.is_global_zero:
            pl_module.encoder.save(self.dirpath, model_card=self.model_card(pl_module))
            rank_zero_info(f"\n[codiemb] exported {self.exported_from} to {Path(self.dirpath).resolve()}")
        trainer.strategy.barrier("codiemb-export")

    def model_card(self, pl_module: pl.LightningModule) -> str:
        hp = dict(pl_module.hparams)
        lines = ["---", "library_name: sentence-transformers", "tags: [sentence-transformers, codiemb]", "---", "",
                 "# CoDiEmb fine-tuned encoder", "",
                 f"Base model: `{hp.get('model_name_or_path')}`; trained with codiemb_pl ({self.exported_from}).", "",
                 "```python", "from sentence_transformers import SentenceTransformer",
                 "model = SentenceTransformer('PATH')", "```"]
        return "\n".join(lines) + "\n"
