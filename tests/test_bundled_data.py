"""Bundled real, non-medical sets by name: scikit-learn's digits."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.datasets import load_digits

from medistill.data import load_dataset
from medistill.data.bundled import stratified_split
from medistill.study.spec import dataset_label, resolve_path_ref


def test_digits_loads_by_name_split_resized_and_marked_not_medical():
    data = load_dataset("digits")
    assert data.num_classes == 10 and data.channels == 1 and data.image_size == 28
    assert len(data.train) + len(data.val) + len(data.test) == 1797
    assert len(data.test) == 360 and data.class_counts() == np.bincount(load_digits().target[stratified_split(load_digits().target)["train"]]).tolist()
    assert data.source.kind == "bundled" and data.source.provenance["medical"] is False
    assert load_dataset("digits", image_size=16, channels=3).train.images.shape[1:] == (3, 16, 16)
    # the same split every time, and no image in two splits
    again = load_dataset("digits")
    assert torch.equal(again.test.labels, data.test.labels)
    parts = stratified_split(load_digits().target)
    assert not set(parts["train"]) & set(parts["test"]) and not set(parts["val"]) & set(parts["test"])


def test_a_study_names_digits_like_a_flag(tmp_path):
    assert resolve_path_ref("digits", tmp_path) == "digits" and dataset_label("digits") == "digits"
    assert resolve_path_ref("digits.npz", tmp_path) == str((tmp_path / "digits.npz").resolve())
