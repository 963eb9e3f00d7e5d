"""Networks for training on (distilled) images, and the registry that builds them by name."""

from medistill.models.convnet import ConvNet
from medistill.models.zoo import create_model, embedding, list_models, model_summary, register_model

__all__ = ["ConvNet", "create_model", "embedding", "list_models", "model_summary", "register_model"]
