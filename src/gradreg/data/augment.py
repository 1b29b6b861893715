"""Batched training-time augmentation: pad, random crop, random horizontal flip.

The SGR paper (Roth et al. 2018, arXiv 1805.08736) trains on CIFAR-10 with the standard
augmentation: pad by 4 pixels, take a random 32×32 crop, flip horizontally with probability
½. The paper does not say how it pads. **Our choice: zero padding** (as ``torchvision``'s
``RandomCrop(32, padding=4)`` does by default). Zero lies in the [0, 1] pixel range, so an
augmented batch stays inside the bounds its input was in whenever those bounds contain 0.

Everything is one gather over the whole batch, driven by one ``torch.Generator``: the same
seed gives the same crops and flips on every call.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

KINDS = ("none", "crop", "crop-flip")


def _draw(n: int, high: int, *, generator: torch.Generator | None, device: torch.device) -> Tensor:
    # Draw on the generator's device (a CUDA generator cannot fill a CPU tensor), then move.
    gen_device = generator.device if generator is not None else device
    return torch.randint(0, high, (n,), generator=generator, device=gen_device).to(device)


def augment(x: Tensor, *, kind: str, generator: torch.Generator | None = None, pad_pixels: int = 4) -> Tensor:
    """Augment a batch ``x`` of shape ``(N, C, H, W)``; returns a new tensor of the same shape.

    - ``"none"``: ``x`` itself, unchanged.
    - ``"crop"``: zero-pad every side by ``pad_pixels``, then crop an ``H×W`` window at a
      uniformly random offset in ``{0, …, 2·pad_pixels}²``, independently per image.
    - ``"crop-flip"``: the crop, then mirror left-right with probability ½ per image.

    Random draws, in this order, all from ``generator``: row offsets (N), column offsets (N),
    flip coins (N; ``"crop-flip"`` only).

    Example::

        gen = torch.Generator().manual_seed(0)
        xb = augment(xb, kind=bundle.augment_kind, generator=gen)
    """
    if kind not in KINDS:
        raise ValueError(f"unknown augmentation {kind!r}; known: {', '.join(KINDS)}")
    if x.dim() != 4:
        raise ValueError(f"augment expects a batch (N, C, H, W), got shape {tuple(x.shape)}")
    if pad_pixels < 0:
        raise ValueError(f"pad_pixels must be ≥ 0, got {pad_pixels}")
    if kind == "none":
        return x
    n, _, h, w = x.shape
    p = pad_pixels
    padded = F.pad(x, (p, p, p, p))  # (N, C, H+2p, W+2p), zeros outside the image
    off_y = _draw(n, 2 * p + 1, generator=generator, device=x.device)  # (N,)
    off_x = _draw(n, 2 * p + 1, generator=generator, device=x.device)  # (N,)
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = off_y[:, None] + ar_h  # (N, H): padded row read by each output row
    cols = off_x[:, None] + ar_w  # (N, W): padded column read by each output column
    if kind == "crop-flip":
        flip = _draw(n, 2, generator=generator, device=x.device).bool()  # (N,)
        # A flipped crop reads its window right to left: output column j <- window column W-1-j.
        cols = torch.where(flip[:, None], off_x[:, None] + (w - 1 - ar_w), cols)
    batch = torch.arange(n, device=x.device)
    # Advanced indices on dims 0, 2, 3 broadcast to (N, H, W); the sliced channel dim goes last.
    out = padded.permute(0, 2, 3, 1)[batch[:, None, None], rows[:, :, None], cols[:, None, :]]  # (N, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()  # (N, C, H, W)
