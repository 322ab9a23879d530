"""`model.compile`: torch.compile of the backbone in place, with a one-line fallback to eager.

`compile_in_place(module, backend)` uses `nn.Module.compile`, so parameter names, the state dict, LoRA adapters
(compile the PEFT wrapper) and DDP's parameter hooks are those of the eager module. Shapes: the first call is
compiled for its shape; at the first new shape PyTorch marks the varying sizes (rows, sequence width) dynamic
and compiles once more (`dynamic=None`, "automatic dynamic"), so length buckets, packed rows and the gradient
cache's chunks share one dynamic graph per grad mode instead of one graph per width.
`call_compiled(module, inputs)` runs the compiled module; when compiling fails (a `TorchDynamoException`: an
operator dynamo cannot trace, a backend error) it warns once, puts the eager forward back and runs that.

Backward graphs: AOT autograd compiles a graph's backward lazily by default, at its first `backward()`, where a
backend failure would escape as a crash in the middle of a step (after some gradients were accumulated: the gradient
cache back-propagates chunk by chunk). `call_compiled` has it compiled with the forward instead
(`torch._functorch.config.force_non_lazy_backward_lowering`), so a backward that does not compile fails the forward
call: the same fallback then runs that forward eager, before any gradient of it exists, and the step's loss and
gradients are the eager step's (whether its backward starts at the loss, in a manual step, or in the gradient cache's
replay). Graphs traced without grad (validation, the cache's first pass) have no backward and compile as before.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from codiemb_pl.errors import InputError

COMPILE_BACKENDS_DEFAULT = "inductor"


def compile_backend(setting: bool | str | None) -> str | None:
    """The backend a `model.compile` setting names: None (off) for false, inductor for true, else the name (one
    `InputError` for a backend torch does not know)."""
    if setting is None or setting is False or setting == "false":
        return None
    backend = COMPILE_BACKENDS_DEFAULT if setting is True or setting == "true" else str(setting)
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise InputError("model.compile", f"unknown torch.compile backend {backend!r}",
                         f"use true (inductor), false, or one of: {', '.join(sorted(known))}")
    return backend


def compile_in_place(module: nn.Module, backend: str) -> None:
    """Compile `module`'s forward with `backend` (state dict and parameters unchanged)."""
    module.compile(backend=backend, dynamic=None)


def is_compiled(module: nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def call_compiled(module: nn.Module, inputs: dict[str, Any]) -> Any:
    """`module(**inputs)`; if compiling it fails, one warning, the eager forward from then on."""
    if not is_compiled(module):
        return module(**inputs)
    import torch._dynamo
    import torch._functorch.config

    try:
        with torch._functorch.config.patch(force_non_lazy_backward_lowering=True):   # backward fails here, not later
            return module(**inputs)
    except torch._dynamo.exc.TorchDynamoException as error:
        name = getattr(getattr(module, "config", None), "model_type", type(module).__name__)
        cause = getattr(error, "inner_exception", None) or error   # a backend's own error, not dynamo's wrapper
        reason = (str(cause).strip().splitlines() or [""])[0][:160]
        warnings.warn(f"[codiemb] model.compile: {name} did not compile ({type(cause).__name__}: {reason}); "
                      "running it eager", stacklevel=2)
        module._compiled_call_impl = None
        return module(**inputs)
