"""Targeted PGD variants: least-likely targets, and the all-targets reading of the SGR paper's
T-PGD, which must sit below untargeted PGD on a clean model (the paper's ordering) while a
single random target sits above it."""
from __future__ import annotations

import pytest
import torch

from gradreg import ThreatModel
from gradreg.attacks import make
from gradreg.attacks.gradient import least_likely_targets
from gradreg.attacks.pgd_core import ce_loss, pgd


def _acc(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_least_likely_targets_are_the_lowest_logit(digits_cw, digits) -> None:  # type: ignore[no-untyped-def]
    x = digits.test_x[:64]
    with torch.no_grad():
        logits = digits_cw(x)
    t = least_likely_targets(digits_cw, x)
    assert torch.equal(logits.gather(1, t[:, None]).squeeze(1), logits.min(dim=1).values)


def test_all_targets_tpgd_is_below_pgd_and_random_target_above(digits_cw, digits) -> None:  # type: ignore[no-untyped-def]
    x, y = digits.test_x[:200], digits.test_y[:200]
    threat = ThreatModel("linf", 0.1, (0.0, 1.0))
    acc = {name: _acc(digits_cw, make(name, steps=5, seed=0)(digits_cw, x, y, threat), y)
           for name in ("pgd", "tpgd", "tpgd-all")}
    assert acc["tpgd-all"] < acc["pgd"] < acc["tpgd"], acc
    x, y = x[:40], y[:40]
    # every point tpgd-all leaves correct survives each single targeted run started from x with
    # the same target: an independent check that "broken" means broken by some target
    x_all = make("tpgd-all", steps=5, random_start=False)(digits_cw, x, y, threat)
    with torch.no_grad():
        robust = digits_cw(x_all).argmax(1) == y
    broken_somewhere = torch.zeros_like(robust)
    for shift in range(1, 10):
        xa = pgd(digits_cw, x, threat, ce_loss((y + shift) % 10, targeted=True), steps=5, rel_stepsize=0.5,
                 random_start=False)
        with torch.no_grad():
            broken_somewhere |= digits_cw(xa).argmax(1) != y
    assert torch.equal(robust, ~broken_somewhere)
    assert float((x_all - x).abs().max()) <= 0.1 + 1e-6


def test_targets_option_is_checked() -> None:
    with pytest.raises(ValueError, match="targets must be one of"):
        make("tpgd", targets="nearest")
