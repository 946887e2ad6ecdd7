"""The one class-label range check the backbones share: refuses labels outside the table on CPU in eager mode, and
traces without a graph break under torch.compile (where ``int(y.min())`` would split the graph)."""

from __future__ import annotations

import pytest
import torch

from dtx.errors import ShapeError
from dtx.layers import check_label_range


def test_labels_outside_the_table_are_refused_with_the_range():
    check_label_range(torch.tensor([0, 3, 10]), 11)
    check_label_range(torch.zeros(0, dtype=torch.long), 11)  # nothing to check
    with pytest.raises(ShapeError, match=r"\[0, 10\] \(10 = null\), got 0\.\.11"):
        check_label_range(torch.tensor([0, 11]), 11, " (10 = null)")
    with pytest.raises(ShapeError, match=r"got -1\.\.2"):
        check_label_range(torch.tensor([-1, 2]), 11)


def test_the_check_adds_no_graph_break_under_torch_compile():
    table = torch.nn.Embedding(11, 4)

    def embed(y: torch.Tensor) -> torch.Tensor:
        check_label_range(y, table.num_embeddings)
        return table(y) * 2

    explanation = torch._dynamo.explain(embed)(torch.tensor([1, 2, 3]))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
