"""Batched training-time augmentation (pad, random crop, random horizontal flip) and the
per-image standardization that the SGR paper applies inside its model.

The SGR paper (Roth et al. 2018, arXiv 1805.08736) trains with pad + random crop (and a random
horizontal flip on CIFAR-10) and standardizes every image. It pads by 4 pixels and takes a
random crop of the original size. How it pads: its footnote shifts CIFAR so that padding adds
mid-range pixels, not black ones. Both are offered: ``pad_value=0`` (the default, as
``torchvision``'s ``RandomCrop(32, padding=4)``) and ``pad_value`` = the middle of the bounds
(``pad_value_for("mid", bounds)``, the paper's), the same as shifting the data to be centred
at 0 and padding with zeros. Either value lies in the bounds, so an augmented batch stays in
them.

Per-image standardization (TensorFlow's ``per_image_standardization``, which the paper's
code base uses): x ↦ (x − mean(x)) / max(std(x), 1/√d) per image, d = C·H·W. It is part of the
*model*, not of the data (:func:`attach_standardization`), so inputs, bounds and ε stay in
pixel units and the attacks differentiate through it.

Everything is one gather over the whole batch, driven by one ``torch.Generator``: the same
seed gives the same crops and flips on every call.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from torch import nn

KINDS = ("none", "crop", "crop-flip")
PADS = ("zero", "mid")
STANDARDIZATIONS = ("none", "per-image")


def _draw(n: int, high: int, *, generator: torch.Generator | None, device: torch.device) -> Tensor:
    # Draw on the generator's device (a CUDA generator cannot fill a CPU tensor), then move.
    gen_device = generator.device if generator is not None else device
    return torch.randint(0, high, (n,), generator=generator, device=gen_device).to(device)


def pad_value_for(pad: str, bounds: tuple[float, float]) -> float:
    """The padding value: ``"zero"`` → 0, ``"mid"`` → the middle of the input bounds."""
    if pad not in PADS:
        raise ValueError(f"unknown padding {pad!r}; known: {', '.join(PADS)}")
    return 0.0 if pad == "zero" else (float(bounds[0]) + float(bounds[1])) / 2


def augment(x: Tensor, *, kind: str, generator: torch.Generator | None = None, pad_pixels: int = 4,
            pad_value: float = 0.0) -> Tensor:
    """Augment a batch ``x`` of shape ``(N, C, H, W)``; returns a new tensor of the same shape.

    - ``"none"``: ``x`` itself, unchanged.
    - ``"crop"``: pad every side by ``pad_pixels`` with ``pad_value``, then crop an ``H×W`` window at a
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
    padded = F.pad(x, (p, p, p, p), value=float(pad_value))  # (N, C, H+2p, W+2p), pad_value outside the image
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


def standardize_per_image(x: Tensor) -> Tensor:
    """(x − mean) / max(std, 1/√d) over each image's d = C·H·W values (population std, as
    TensorFlow's ``per_image_standardization``); ``(N, C, H, W) -> (N, C, H, W)``."""
    flat = x.flatten(1)  # (N, d)
    mean = flat.mean(dim=1, keepdim=True)
    std = flat.std(dim=1, unbiased=False, keepdim=True).clamp_min(flat.shape[1] ** -0.5)
    return ((flat - mean) / std).view_as(x)


def _standardize_hook(module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    return (standardize_per_image(args[0]), *args[1:])


def attach_standardization(model: nn.Module, kind: str) -> nn.Module:
    """Make ``model`` standardize each input image first (``kind="per-image"``) by a forward
    pre-hook: no parameters, the same state dict, so saved weights load into the plain model
    and the hook is re-attached from the run's configuration. Idempotent; returns ``model``."""
    if kind not in STANDARDIZATIONS:
        raise ValueError(f"unknown standardization {kind!r}; known: {', '.join(STANDARDIZATIONS)}")
    if kind == "per-image" and not getattr(model, "_gradreg_per_image", False):
        model.register_forward_pre_hook(_standardize_hook)
        model._gradreg_per_image = True  # type: ignore[assignment]  # marks the hook as attached
    return model
