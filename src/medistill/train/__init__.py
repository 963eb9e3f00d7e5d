"""Evaluation engine: train fresh networks on a set and score them with MedMNIST's metrics."""

from medistill.train.engine import TrainProtocol, evaluate, loss_function, model_seeds, test_scores, train_model
from medistill.train.metrics import Scores, predict_scores, score
from medistill.train.stacked import StackedModels, can_stack, stacked_test_scores, train_stacked

__all__ = [
    "Scores", "StackedModels", "TrainProtocol", "can_stack", "evaluate", "loss_function", "model_seeds", "predict_scores",
    "score", "stacked_test_scores", "test_scores", "train_model", "train_stacked",
]
