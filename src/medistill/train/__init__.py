"""Training and scoring evaluation networks: the protocol, the sequential and stacked trainers, and scores."""

from medistill.train.engine import scores_on, train_model
from medistill.train.evaluation import evaluate
from medistill.train.metrics import Scores, predict_scores, score
from medistill.train.protocol import TrainProtocol, loss_function, model_seeds
from medistill.train.stacked import StackedModels, can_stack, stacked_scores_on, train_stacked

__all__ = [
    "Scores",
    "StackedModels",
    "TrainProtocol",
    "can_stack",
    "evaluate",
    "loss_function",
    "model_seeds",
    "predict_scores",
    "score",
    "scores_on",
    "stacked_scores_on",
    "train_model",
    "train_stacked",
]
