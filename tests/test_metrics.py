"""Shared metrics against values worked out by hand."""

import math

import torch

from bitstorm.metrics import top2diff, topk_correct


def test_top2diff_by_hand():
    logits = torch.tensor([[0.0, 0.0, math.log(2.0)], [5.0, 5.0, 0.0]])
    # Row 0: probabilities 1/4, 1/4, 1/2 -> 50 - 25 = 25 percent; row 1: a tie -> 0.
    torch.testing.assert_close(top2diff(logits), torch.tensor([25.0, 0.0]))


def test_top2diff_is_nan_for_non_finite_logits():
    result = top2diff(torch.tensor([[1.0, float("inf")], [float("nan"), 0.0], [1.0, 0.0]]))
    assert result[:2].isnan().all() and result[2].isfinite()


def test_topk_correct():
    logits = torch.tensor([[0.1, 0.9, 0.5], [0.7, 0.2, 0.1]])
    labels = torch.tensor([2, 0])
    assert topk_correct(logits, labels, 1).tolist() == [False, True]
    assert topk_correct(logits, labels, 2).tolist() == [True, True]
    assert topk_correct(logits, labels, 5).tolist() == [True, True]
