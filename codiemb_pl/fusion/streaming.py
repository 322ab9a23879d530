"""Old import path kept only until `workflows/probe.py` imports from `codiemb_pl.fusion` (then deleted)."""

from codiemb_pl.fusion.keys import key_seed  # noqa: F401
from codiemb_pl.fusion.sources import TensorSource, as_source  # noqa: F401
