"""frontier: one point per T from the sweep's metrics files -> a CSV (DVC plots) and a PNG.

Not one of the seven stages: it closes the ``pipelines/sweep-t`` profile, which runs
convert -> distill -> finetune -> evaluate once per T. The table itself is built in
``evaluation/frontier.py``.
"""

from snn_research.evaluation.frontier import COLUMNS, frontier_points, write_frontier  # noqa: F401
