"""Stable MTT settings for 28x28 MedMNIST, per IPC: what `mtt` runs when it is given no settings.

The MTT reference has no single default: its README gives settings per dataset and IPC, and none
for 28x28 medical images. The feasibility study's settings (lr_img 1000, syn_lr 0.01, syn_steps 20,
ZCA) diverge on BreastMNIST (docs/RESULTS.md, MTT), so the default is the stable preset of the
nearest IPC (nearest on a log scale: IPC 3 -> 1, 4 -> 10, 23 -> 50). The values, with the
measured reason beside each, are the shipped presets mtt-28-ipc{1,10,50} (`medistill presets`),
read from there: one copy of each setting.
"""

from __future__ import annotations

import math
from typing import Any

from medistill.configfile import read_yaml
from medistill.presets import preset_path

STABLE_IPCS = (1, 10, 50)


def stable_settings(ipc: int) -> dict[str, Any]:
    """The settings of the shipped stable preset for one of `STABLE_IPCS` (a fresh dict)."""
    return read_yaml(preset_path(f"mtt-28-ipc{ipc}"))


def stable_preset(ipc: int) -> dict[str, Any]:
    """The stable preset of the IPC nearest to `ipc` on a log scale."""
    nearest = min(STABLE_IPCS, key=lambda preset: (abs(math.log(max(ipc, 1)) - math.log(preset)), preset))
    return stable_settings(nearest)


__all__ = ["STABLE_IPCS", "stable_preset", "stable_settings"]
