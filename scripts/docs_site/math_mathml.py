"""Math rendered at build time: the LaTeX that `pymdownx.arithmatex` (generic mode) marks up becomes MathML,
which browsers draw natively (no MathJax or KaTeX script, no CDN, no fonts to bundle). A formula that does not
convert stops the build with its text."""

from __future__ import annotations

import html
import re

INLINE = re.compile(r'<span class="arithmatex">\\\((.+?)\\\)</span>', re.S)
BLOCK = re.compile(r'<div class="arithmatex">\\\[(.+?)\\\]</div>', re.S)


def to_mathml(latex: str, display: str) -> str:
    from latex2mathml.converter import convert

    try:
        return convert(latex, display=display)
    except Exception as error:  # latex2mathml raises its own classes and plain ones alike
        raise ValueError(f"cannot render the formula {latex!r}: {error}") from error


def render(page_html: str) -> str:
    """`page_html` with every arithmatex formula replaced by MathML (blocks as `display="block"`)."""
    page_html = BLOCK.sub(lambda m: "<div class=\"math-block\">"
                          + to_mathml(html.unescape(m.group(1)).strip(), "block") + "</div>", page_html)
    return INLINE.sub(lambda m: to_mathml(html.unescape(m.group(1)).strip(), "inline"), page_html)
