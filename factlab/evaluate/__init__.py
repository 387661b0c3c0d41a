"""Evaluation: batched generation with a KV cache, exact-match QA accuracy per attribute,
first-token accuracy; metrics are pure functions over predictions where possible."""

from factlab.evaluate.generate import evaluate_qa, generate
from factlab.evaluate.metrics import (accuracy_by_attribute, attribute_mean, exact_match,
                                      first_token_accuracy, metrics_from_predictions)

__all__ = ["generate", "evaluate_qa", "exact_match", "accuracy_by_attribute",
           "attribute_mean", "metrics_from_predictions", "first_token_accuracy"]
