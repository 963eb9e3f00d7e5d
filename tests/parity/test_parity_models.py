"""ConvNet geometry and model names as in DatasetCondensation's networks.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medistill.models import create_model
from medistill.models.convnet import ConvNet


@pytest.mark.parametrize(("channels", "size", "after_first_conv"), [(1, 28, 32), (3, 28, 32), (1, 32, 36), (3, 32, 32)])
def test_convnet_feature_sizes(channels: int, size: int, after_first_conv: int) -> None:
    # 28-px input is padded by 3 (28 -> 32 -> 16 -> 8 -> 4); 1-channel input is padded by 3 at every size
    # (32 -> 36 -> 18 -> 9 -> 4); 3-channel 32-px by 1 (32 -> 16 -> 8 -> 4): 128 x 4 x 4 = 2048 features each.
    model = ConvNet(channels, 10, size)
    seen: list[int] = []
    model.features[0].register_forward_hook(lambda module, args, out: seen.append(out.shape[-1]))
    features = model.embed(torch.randn(2, channels, size, size))
    assert seen == [after_first_conv]
    assert features.shape == (2, 2048) and model.embed_dim == 2048
    assert model.classifier.in_features == 2048


def test_resnet18_is_instance_norm_and_resnet18_bn_batch_norm() -> None:
    plain = create_model("resnet18", 3, 10, 32)
    bn = create_model("resnet18_bn", 3, 10, 32)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in plain.modules())
    assert any(isinstance(m, nn.GroupNorm) and m.num_groups == m.num_channels for m in plain.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in bn.modules())
