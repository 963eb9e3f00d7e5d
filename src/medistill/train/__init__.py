"""Evaluation engine: train fresh networks on a set and score them with MedMNIST's metrics."""

from medistill.train.engine import TrainProtocol, evaluate, loss_function, model_seeds, test_scores, train_model
from medistill.train.metrics import Scores, predict_scores, score

__all__ = ["Scores", "TrainProtocol", "evaluate", "loss_function", "model_seeds", "predict_scores", "score", "test_scores", "train_model"]
