"""The annotated source shown in the book is the package's real source, block by block."""

from __future__ import annotations

import inspect

import pytest

from selora.book import annotate
from selora.core.fisher import fi_ratio, sample_stats
from selora.core.layers import expanded_factors


def test_a_block_is_the_files_lines_between_the_markers():
    block = annotate.source_block(sample_stats, "new = ", "return torch.stack")
    file_lines = open(inspect.getsourcefile(sample_stats), encoding="utf-8").read().splitlines()
    shown = file_lines[block.first - 1 : block.last]
    assert block.code.splitlines() == [line[4:] for line in shown]  # dedented by the function body's indent
    assert block.code.startswith("new = ") and "return torch.stack" in block.code.splitlines()[-1]
    assert block.where == f"selora/core/fisher.py, lines {block.first}–{block.last}"


def test_one_marker_shows_one_line_and_a_missing_marker_is_a_clear_error():
    assert annotate.source_block(fi_ratio, "return fi_exp / fi_orig").code == "return fi_exp / fi_orig"
    with pytest.raises(ValueError, match="fi_ratio: no line .* last marker 'no such text'"):
        annotate.source_block(fi_ratio, "if fi_orig > 0", "no such text")


def test_show_source_is_a_captioned_markdown_code_block():
    md = annotate.show_source(fi_ratio, "if fi_orig > 0", "return math.inf").data
    assert md.startswith("```python\nif fi_orig > 0:\n") and "selora/core/fisher.py, lines" in md


def test_a_decorated_method_shows_its_own_file():
    """``expanded_factors`` runs under ``torch.no_grad()``: its block is from selora/core/layers.py, not the
    wrapper."""
    block = annotate.source_block(expanded_factors, "new_A = nn.Parameter", "return new_A")
    assert block.where.startswith("selora/core/layers.py, lines ") and block.code.startswith("new_A = nn.Parameter")
