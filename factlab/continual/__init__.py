"""Continual knowledge learning: fact streams trained experience by experience on the one
loop (``factlab.continual.methods``: replay, cumulative, EWC, LwF as plugins), evaluated
on labelled test facts (``factlab.continual.evaluate``) and measured by pure functions of
the saved predictions (``factlab.continual.metrics``). See docs/continual.md."""
