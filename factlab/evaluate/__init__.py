"""Evaluation: batched generation with a KV cache, exact-match QA accuracy per attribute,
first-token accuracy, teacher-forced answer scores; metrics are pure functions over
predictions where possible."""

from factlab.evaluate.generate import evaluate_qa, generate
from factlab.evaluate.metrics import (accuracy_by_attribute, attribute_mean, exact_match,
                                      first_token_accuracy, metrics_from_predictions)
from factlab.evaluate.score import Scores, score_answers, score_encoded

__all__ = ["generate", "evaluate_qa", "exact_match", "accuracy_by_attribute",
           "attribute_mean", "metrics_from_predictions", "first_token_accuracy",
           "Scores", "score_answers", "score_encoded"]
