"""What a report may conclude from an experiment's rows, beside its tables: which rows train one
objective (so the report shows them once, :func:`alias_groups`), and the honest reading, which
answers the experiment's question of accuracy per cost with paired tests
(:func:`honest_reading`). Pure functions of :mod:`gradreg.tables`' result model; the report
sections that print them are in :mod:`gradreg.experiment_report`."""
from __future__ import annotations

import json
from typing import Any

import torch

from . import experiments, penalties
from .cost import relative_cost
from .stats import adjust_family, compare
from .tables import RowResult, cell_scores


def honest_reading(reading: dict[str, Any], results: dict[str, RowResult], aa_column: str,
                   aliases: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Which rows reach ``accuracy_fraction`` of the reference row's *gain over clean* in the
    robust column at no more than ``cost_fraction`` of its step cost.

    - Bar (per point and seed): clean + f·(reference − clean), the clean row's and the
      reference's outcomes on the same points (f = ``accuracy_fraction``; without a clean row,
      f·reference). A share of the gain, not of the reference's accuracy: at ε = 0.1 on MNIST a
      clean model keeps ~79 %, so 0.9 × the reference would be a bar only ~40 % of the way.
    - Accuracy: a paired test of the row's outcomes against the bar (gradreg.stats.compare: the
      two-level test over seeds and points); the verdicts of all candidates are one family,
      Holm-adjusted. A row "reaches" the bar only where the adjusted test says it is above.
    - Cost: the row's median step ratio over the reference's, with its bootstrap interval over
      the interleaved rounds (gradreg.cost.relative_cost); "on the edge" where that interval
      holds the cost bar, which is then not a pass.
    - Candidates: every row but the reference, the clean row and rows of ``exclude_methods``:
      cheap baselines (FGSM-AT, FGSM with random start) compete like any regularizer. A row
      that is an alias of another (same resolved objective) is judged once, under its first name."""
    ref_name = str(reading["reference"])
    acc_frac, cost_frac = float(reading.get("accuracy_fraction", 0.9)), float(reading.get("cost_fraction", 0.35))
    exclude = set(reading.get("exclude_methods", ())) | {"clean"}
    skipped = {a for names in (aliases or {}).values() for a in names}
    question = (f"Which method, if any, reaches {acc_frac:.0%} of {ref_name}'s gain over clean training in "
                f"{aa_column} at ≤ {cost_frac:.0%} of its training cost?")
    ref = results.get(ref_name)
    ref_scores = cell_scores(ref, aa_column) if ref is not None else None
    if ref is None or ref.step_cost is None or ref_scores is None:
        return {"sentence": f"{question} Not answerable here: {ref_name} has no {aa_column} cell or step cost.",
                "rows": [], "reached": []}
    ref_flat = (torch.stack(ref_scores) if len(ref_scores) > 1 else ref_scores[0]).double()  # (n,) or (S, n)
    clean_row = next((r for r in results.values() if r.method == "clean"), None)
    clean_scores = cell_scores(clean_row, aa_column) if clean_row is not None else None
    base = ((torch.stack(clean_scores) if len(clean_scores) > 1 else clean_scores[0]).double()
            if clean_scores is not None else torch.zeros_like(ref_flat))
    bar_scores = base + acc_frac * (ref_flat - base)  # per point and seed, in [0, 1]
    ref_aa, base_aa, bar_value = float(ref_flat.mean()), float(base.mean()), float(bar_scores.mean())
    if ref_aa <= base_aa:
        return {"sentence": f"{question} Void here: {ref_name}'s {aa_column} accuracy ({100 * ref_aa:.1f} %) is no "
                            f"gain over clean training's ({100 * base_aa:.1f} %).", "rows": [], "reached": []}
    candidates, tests, costs = [], [], []
    for name, res in results.items():
        scores = cell_scores(res, aa_column)
        if name == ref_name or name in skipped or res.method in exclude or scores is None or res.step_cost is None:
            continue
        candidates.append(name)
        tests.append(compare(torch.stack(scores) if len(scores) > 1 else scores[0], bar_scores, a=name, b="the bar"))
        costs.append(relative_cost(res.step_cost, ref.step_cost))
    tests = adjust_family(tests)
    verdicts, reached, undecided, edge, cheap_rows = [], [], [], [], []
    for name, test, cost in zip(candidates, tests, costs):
        verdict = ("reaches the bar" if test.significant and test.diff > 0 else
                   "falls short of the bar" if test.significant else "not distinguishable from the bar at this n")
        where = cost.versus(cost_frac)
        if where == "within":
            cheap_rows.append(name)
            if verdict == "reaches the bar":
                reached.append(name)
            elif not test.significant:
                undecided.append(name)
        elif where == "on the edge of" and verdict != "falls short of the bar":
            edge.append(name)
        alias = f" (≡ {', '.join(aliases[name])})" if aliases and aliases.get(name) else ""
        verdicts.append(f"{name}{alias}: cost {cost.text()} of {ref_name}'s, {where} the {cost_frac:.0%} bar; "
                        f"{aa_column} {100 * float(test.diff + bar_value):.1f} vs the bar {100 * bar_value:.1f}: "
                        f"{verdict} ({test.p_text()}, difference {100 * test.diff:+.1f} points, n = {test.n}, "
                        f"{test.seeds} seed{'s' if test.seeds > 1 else ''})")
    bar = (f"clean {100 * base_aa:.1f} % + {acc_frac:.0%} of {ref_name}'s gain to {100 * ref_aa:.1f} % = "
           f"{100 * bar_value:.1f} %")
    if reached:
        answer = (f"**{', '.join(reached)}**: within the cost bar and above the accuracy bar ({bar}) by the paired "
                  "two-level test, Holm-adjusted over the candidates.")
    elif undecided or edge:
        parts = []
        if undecided:
            parts.append(f"{', '.join(undecided)} {'is' if len(undecided) == 1 else 'are'} within the cost bar but not "
                         f"distinguishable from the accuracy bar ({bar}) at this n after Holm's correction")
        if edge:
            parts.append(f"{', '.join(edge)} {'is' if len(edge) == 1 else 'are'} on the edge of the cost bar (its "
                         "interval over rounds holds the bar)")
        answer = "**None established**: " + "; ".join(parts) + "."
    elif cheap_rows:
        answer = f"**None**: every candidate within the cost bar falls short of the accuracy bar ({bar}) by a paired test."
    else:
        answer = "**None**: no candidate is within the cost bar."
    return {"sentence": f"{question} {answer}", "rows": verdicts, "reached": reached, "undecided": undecided,
            "cost_edge": edge, "reference_autoattack": ref_aa, "clean_autoattack": base_aa, "bar": bar_value,
            "accuracy_fraction": acc_frac, "cost_fraction": cost_frac,
            "tests": [t.as_dict() for t in tests]}


def resolved_objective(row: experiments.Row, lam: float | None) -> tuple[Any, ...]:
    """A canonical form of the row's training objective, equal for two rows exactly when their
    objectives are the same by construction, with the modules' defaults filled in (λ, φ, σ,
    solver). Known identities (our reading of the modules' formulas, single-head models):

    - DataGrad-ℓ1 with the finite-difference solver is (1 − λ/φ)·L(x) + (λ/φ)·L(x + φ·sign g)
      (gradreg.penalties.datagrad) and Lyu's ℓ∞ one-step solver, unclipped, is
      (1 − λ)·L(x) + λ·L(x + σ·sign g) (gradreg.penalties.lyu): both are "a mix of the clean loss
      and the loss one sign step away", keyed by (step, weight);
    - DataGrad-ℓ1 with the exact solver is L(x) + λ·‖∇ₓL‖₁ and Lyu's ℓ∞ exact solver is
      L(x) + λσ·‖∇ₓL‖₁: both are "the loss plus c·‖∇ₓL‖₁", keyed by c.

    FGSM-AT clips its point to the data bounds and has a BatchNorm policy, so it is not folded
    in. Any other row is keyed by its method, λ, penalty and training overrides as declared."""
    pen = dict(row.penalty)
    rest = (row.task_weight, json.dumps(row.train, sort_keys=True, default=str))
    single_head = not row.train.get("aux")  # DataGrad penalizes every head, Lyu the main one: no identity
    if (single_head and row.method == "datagrad" and pen.get("p", 1) == 1 and not pen.get("squared")
            and set(pen) <= {"p", "solver", "fd_step", "squared"}):
        default = penalties.make("datagrad", p=1, solver="fd")  # the module's default λ and φ
        lam_dg = default.default_lam if lam is None else float(lam)
        if pen.get("solver", "exact") == "fd":
            step = float(pen.get("fd_step", default.fd_step))
            return ("sign-step mix", round(step, 12), round(lam_dg / step, 12), *rest)
        if "fd_step" not in pen:
            return ("l1 gradient norm", round(lam_dg, 12), *rest)
    if (single_head and row.method == "lyu" and pen.get("norm", "linf") == "linf"
            and set(pen) <= {"norm", "solver", "sigma"}):
        default = penalties.make("lyu", norm="linf")  # the module's default σ and λ
        sigma = float(pen.get("sigma", default.sigma))
        lam_lyu = default.default_lam if lam is None else float(lam)
        if pen.get("solver", "exact") == "onestep":
            return ("sign-step mix", round(sigma, 12), round(lam_lyu, 12), *rest)
        return ("l1 gradient norm", round(lam_lyu * sigma, 12), *rest)
    return ("as declared", row.method, lam, json.dumps(pen, sort_keys=True, default=str), *rest)


def objective_text(key: tuple[Any, ...]) -> str:
    """A :func:`resolved_objective` key in words (the report's sentence on rows with one objective)."""
    if key[0] == "sign-step mix":
        return f"(1 − w)·L(x) + w·L(x + φ·sign ∇ₓL) with φ = {key[1]:g}, w = {key[2]:g}"
    if key[0] == "l1 gradient norm":
        return f"L(x) + c·‖∇ₓL‖₁ with c = {key[1]:g}"
    return f"{key[1]} at λ = {key[2]}, penalty {key[3]}"


def alias_groups(rows: list[experiments.Row], lams: dict[str, float | None]) -> dict[str, list[str]]:
    """First row name → the later rows with the same :func:`resolved_objective` (only groups of ≥ 2)."""
    groups: dict[tuple[Any, ...], list[str]] = {}
    for row in rows:
        groups.setdefault(resolved_objective(row, lams.get(row.name, row.lam)), []).append(row.name)
    return {names[0]: names[1:] for names in groups.values() if len(names) > 1}
