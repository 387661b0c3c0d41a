"""Experiments: named YAML recipes run as a grid of cells into a run directory, with a
Markdown report (paper numbers beside ours) and PNG plots."""
