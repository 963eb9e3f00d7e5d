"""Cache-sized micro-batches: on the CPU, a large batch is computed in chunks whose activations fit the cache.

A batch's mean loss is the size-weighted sum of its chunks' mean losses, so when every image's output
depends on that image alone (no batch norm in training mode), the gradient accumulated over chunks is
the batch's gradient, and chunked logits or features are the batch's, up to float rounding. What
changes is where the work runs from: a ConvNet's memory-bound passes between convolutions (instance
norm, ReLU, pooling and their backward passes) read and write every activation, and once a chunk's
largest activation fits in the cache they run from there instead of from main memory. On the CPU this
makes a 256-image training step faster and needs a fraction of the memory (docs/RESULTS.md,
"CPU speed"). On a GPU the whole batch is kept: there, parallel work, not the cache,
bounds the speed.

`chunk_size` picks the images per chunk from the network itself: the largest output of any layer for
one image, against `CACHE_BYTES`. So a 28-px image gets chunks of 8 and a 224-px one chunks of 1,
for a reason that holds on any dataset rather than a size tuned to one.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

# The largest activation of one chunk (at 4 bytes a value). A layer's working set is 3-4 such
# activations (its input, its output, what backward keeps), so 4 MiB keeps it within a core's L2 plus
# its share of a shared L3 (1-2 MiB L2, 4-8 MiB L3 per core on current server CPUs), also when other
# work uses the L3 (the measurements behind it: docs/RESULTS.md, "CPU speed").
CACHE_BYTES = 4 * 2**20
_whole_batches = False  # set by `whole_batches()`


@contextmanager
def whole_batches() -> Iterator[None]:
    """Within this block every batch is computed in one piece, as without chunking (a baseline for benchmarks and tests)."""
    global _whole_batches
    before, _whole_batches = _whole_batches, True
    try:
        yield
    finally:
        _whole_batches = before


def samples_independent(module: nn.Module) -> bool:
    """Whether each image's output depends on that image alone: no batch norm that normalises by batch statistics."""
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in module.modules())


def largest_activation_bytes(module: nn.Module, image: Tensor) -> int:
    """Bytes (4 a value) of the largest output of any leaf layer of `module` for one image (1, C, H, W)."""
    sizes: list[int] = [image.numel()]
    leaves = [m for m in module.modules() if not any(True for _ in m.children())]
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: sizes.append(out.numel() if isinstance(out, Tensor) else 0)) for m in leaves
    ]
    was_training = module.training
    try:
        module.eval()  # one image through batch norm in training mode would fail or move its statistics
        with torch.no_grad():
            module(image)
    finally:
        module.train(was_training)
        for hook in hooks:
            hook.remove()
    return 4 * max(sizes)


def chunk_size(module: nn.Module, images: Tensor, *, forward_only: bool = False) -> int | None:
    """Images per chunk when `module` runs on batches like `images` (N, C, H, W), or None for the whole batch.

    None for an empty batch, off the CPU, within `whole_batches()`, and, unless `forward_only` (no
    gradient, the module in eval mode), when the module normalises by batch statistics (chunks would
    change the result, not only its rounding).
    """
    if not len(images) or _whole_batches or images.device.type != "cpu" or (not forward_only and not samples_independent(module)):
        return None
    return max(1, CACHE_BYTES // largest_activation_bytes(module, images[:1]))


def chunks(n: int, size: int | None) -> list[slice]:
    """Slices covering range(n) in round(n / size) chunks of equal size (within one image), one when size is None.

    Rounding, not ceiling: a batch a little over `size` stays whole and no chunk is a small remainder
    (20 images at 16 a chunk would be cut into 16 + 4, measured slower than 20 at once).
    """
    count = 1 if size is None else max(1, round(n / size))
    bounds = [i * n // count for i in range(count + 1)]
    return [slice(a, b) for a, b in itertools.pairwise(bounds) if b > a]


def weighted_chunks(n: int, size: int | None) -> list[tuple[slice, float]]:
    """`chunks(n, size)`, each with its share of the n images: the weight of its mean in the batch's mean."""
    return [(part, (part.stop - part.start) / n) for part in chunks(n, size)]


def backward_in_chunks(loss_of: Callable[[slice], Tensor], n: int, size: int | None) -> None:
    """Accumulate into `.grad` the gradient of the mean loss over n images: each chunk's mean loss, weighted by its share."""
    for part, share in weighted_chunks(n, size):
        (loss_of(part) * share).backward()


def forward_in_chunks(forward: Callable[[Tensor], Tensor], images: Tensor, size: int | None) -> Tensor:
    """forward(images), computed chunk by chunk and concatenated."""
    parts = chunks(images.shape[0], size)
    if len(parts) <= 1:
        return forward(images)
    return torch.cat([forward(images[part]) for part in parts])


__all__ = [
    "CACHE_BYTES",
    "backward_in_chunks",
    "chunk_size",
    "chunks",
    "forward_in_chunks",
    "largest_activation_bytes",
    "samples_independent",
    "weighted_chunks",
    "whole_batches",
]
