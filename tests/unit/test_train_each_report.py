"""train-each's report: the global model scored with all classes, and among a subset's classes only."""

from __future__ import annotations

import torch

from distvision.train_each_report import correct_predictions


def test_among_a_subsets_classes_the_global_model_chooses_only_between_them():
    # Four classes in the union; the subset holds classes 1 and 3.
    logits = torch.tensor([
        [9.0, 2.0, 1.0, 0.0],  # top class 0 is not the subset's: among {1, 3} it is 1
        [0.0, 1.0, 9.0, 2.0],  # top class 2 is not the subset's: among {1, 3} it is 3
        [0.0, 5.0, 0.0, 4.0],  # 1 either way
        [0.0, 3.0, 8.0, 4.0],  # 2 overall, 3 among the subset's
    ])
    labels = torch.tensor([1, 3, 3, 1])
    assert correct_predictions(logits, labels) == 0  # all classes compete: 0, 2, 1, 2
    assert correct_predictions(logits, labels, among=[1, 3]) == 2  # 1, 3, 1, 3
    assert correct_predictions(logits, labels, among=[3, 1]) == 2  # the order of the classes does not matter
    assert correct_predictions(logits, labels, among=range(4)) == correct_predictions(logits, labels)
