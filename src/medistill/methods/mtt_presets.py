"""Stable MTT settings for 28x28 MedMNIST, per IPC: what `mtt` runs when it is given no settings.

The MTT reference has no single default: its README gives settings per dataset and IPC, and none
for 28x28 medical images. The feasibility study's settings (lr_img 1000, syn_lr 0.01, syn_steps 20,
ZCA) diverge on BreastMNIST (docs/RESULTS.md, MTT), so the default is the stable preset of the
nearest IPC (nearest on a log scale: IPC 3 -> 1, 4 -> 10, 23 -> 50). The same values, with the
measured reason beside each, are in configs/mtt-28-ipc{1,10,50}.yaml (a test keeps them equal).
"""

from __future__ import annotations

import math
from typing import Any

_COMMON: dict[str, Any] = {
    "iterations": 1000,
    "expert_epochs": 2,
    "max_start_epoch": 10,
    "syn_lr_init": 0.001,
    "lr_lr": 1.0e-7,
    "min_syn_lr": 1.0e-4,
    "momentum": 0.5,
    "batch_syn": None,
    "zca": False,
    "dsa_strategy": "color_crop_cutout_flip_scale_rotate",
    "eval_every": 250,
    "eval_models": 1,
    "eval_epochs": 300,
    "checkpoint_every": 25,
    "num_experts": 20,
    "buffer_epochs": 30,
    "expert_batch": 256,
    "lr_teacher": 0.01,
    "expert_seed": 0,
    "expert_fp16": False,
}

STABLE_PRESETS: dict[int, dict[str, Any]] = {
    1: {**_COMMON, "syn_steps": 10, "lr_img": 100.0, "unroll": "plain"},
    10: {**_COMMON, "syn_steps": 10, "lr_img": 1000.0, "unroll": "plain"},
    50: {**_COMMON, "syn_steps": 20, "lr_img": 5000.0, "unroll": "bounded"},
}


def stable_preset(ipc: int) -> dict[str, Any]:
    """The stable preset of the IPC nearest to `ipc` on a log scale (a copy)."""
    nearest = min(STABLE_PRESETS, key=lambda preset: (abs(math.log(max(ipc, 1)) - math.log(preset)), preset))
    return dict(STABLE_PRESETS[nearest])


__all__ = ["STABLE_PRESETS", "stable_preset"]
