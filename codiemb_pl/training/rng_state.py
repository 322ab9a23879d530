"""Process-wide RNG states (torch, CUDA, numpy, python `random`) as checkpoint-safe values.

Lightning does not save RNG states, so a resumed run would draw different dropout masks than the
uninterrupted one. These two functions capture and re-apply them; the captured dict holds only tensors,
ints, strings and floats, so it loads under `torch.load(weights_only=True)` (Lightning's default).
"""

from __future__ import annotations

import random
from typing import Any

import torch


def capture_rng_states() -> dict[str, Any]:
    """The current global RNG states of this process."""
    version, python_state, gauss = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy ships with torch's usual installs
        return states
    kind, keys, position, has_gauss, cached_gauss = np.random.get_state()
    states["numpy"] = {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                       "has_gauss": int(has_gauss), "cached_gauss": float(cached_gauss)}
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Re-apply states produced by `capture_rng_states` (parts this process cannot use are skipped)."""
    torch.set_rng_state(states["torch"])
    python = states["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    if "numpy" in states:
        import numpy as np

        saved = states["numpy"]
        np.random.set_state((saved["kind"], saved["keys"].numpy().astype(np.uint32), saved["position"],
                             saved["has_gauss"], saved["cached_gauss"]))
