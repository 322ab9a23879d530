"""How a sub-dataset's `instruction` becomes the prefix of its queries and STS sentences: the one template.

Torch-free, so argument parsers can show the default without importing the model stack. How a prefix is
tokenised and left out of pooling is `model.pooling.prefix_pooling_mask`.
"""

from __future__ import annotations

from typing import Optional

#: The default `data.instruction_template` (and `codiemb evaluate --instruction-template`).
INSTRUCTION_TEMPLATE = "Instruction: {instruction} Query: "


def instruction_prefix(instruction: Optional[str], template: str = INSTRUCTION_TEMPLATE) -> str:
    """`template` filled with `instruction`; the empty string when there is no instruction."""
    return template.format(instruction=instruction) if instruction else ""
