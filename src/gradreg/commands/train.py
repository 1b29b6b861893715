"""``gradreg train``: one run of any method, flags mapping one-to-one onto TrainConfig."""
from __future__ import annotations

import argparse
import dataclasses
import sys

from .. import distributed
from ..config import ConfigError, TrainConfig, apply_overrides, load_toml, parse_set
from ..trainer import train

HELP = "train a model with any method of the family"

# config field → its flag; dict-valued fields are reached through --set / --config
_FLAGS = {f.name: "--" + f.name.replace("_", "-") for f in dataclasses.fields(TrainConfig)
          if f.name not in ("model_params", "penalty")}

# flags whose help says more than their default
_HELP = {
    "add": "add a term λ·penalty: NAME[:lam=λ,key=value,...], e.g. --add trades:lam=2 "
           "--add fgsm-at:lam=0.5,adv_weight=0.5 (repeat for more; replaces the TOML's add list)",
    "data_loader": "auto | memory | stream: index tensors in memory, or read batches through a DataLoader "
                   "(auto: stream a factory's map-style Dataset too large to hold; default auto)",
    "num_workers": "DataLoader worker processes on the streaming path (default 0)",
    "log": "csv | tensorboard: also write TensorBoard events to OUT/tensorboard "
           "(needs pip install gradreg[tensorboard]; default csv)",
}


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per scalar TrainConfig field (defaults None = "not given"), plus --config/--set."""
    defaults = TrainConfig()
    for name, flag in _FLAGS.items():
        default = getattr(defaults, name)
        if isinstance(default, bool):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                                help=f"(default: {default})")
        elif name == "add":
            parser.add_argument(flag, dest=name, action="append", default=None, metavar="SPEC", help=_HELP[name])
        elif isinstance(default, list):
            parser.add_argument(flag, dest=name, type=float, nargs="+", default=None, help=f"(default: {default})")
        else:
            kind = float if name in ("lam", "task_weight", "validation_eps") else (type(default) if default is not None else str)
            parser.add_argument(flag, dest=name, type=kind, default=None, help=_HELP.get(name, f"(default: {default})"))
    parser.add_argument("--stream", dest="data_loader", action="store_const", const="stream",
                        help="same as --data-loader stream")
    parser.add_argument("--config", dest="config_file", metavar="FILE.toml", help="read configuration from TOML")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                        help="set any field, e.g. --set penalty.sigma=0.1 --set model_params.hidden=[64]")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults ← the data set's defaults ← TOML file ← flags ← --set, each later source winning."""
    from ..data import train_defaults

    def build(base: dict[str, object]) -> TrainConfig:
        cfg = TrainConfig()
        apply_overrides(cfg, base)
        if args.config_file:
            apply_overrides(cfg, load_toml(args.config_file))
        apply_overrides(cfg, {name: getattr(args, name) for name in _FLAGS if getattr(args, name, None) is not None})
        apply_overrides(cfg, parse_set(args.overrides))
        return cfg

    from ..api import absolute_paths, check_names

    cfg = build(train_defaults(build({}).data)).validate()  # type: ignore[arg-type]  # values are config scalars
    check_names(cfg)
    absolute_paths(cfg)
    return cfg


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    parser.add_argument("--nproc", type=int, default=1, metavar="N",
                        help="train on N data-parallel processes (shortcut for torchrun --nproc_per_node N)")
    parser.add_argument("--stop-after-epoch", type=int, metavar="K",
                        help="checkpoint and stop once K epochs are done (continue later with --resume)")


def strip_nproc(argv: list[str]) -> list[str]:
    """The command line for the ranks that ``--nproc`` launches: without ``--nproc``, and with
    ``--log X`` passed as ``--set log=X``, since torchrun's own parser takes ``--log`` for an
    abbreviation of its ``--log-dir`` even after the script name."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        if a.startswith("--log="):
            out += ["--set", "log=" + a.partition("=")[2]]
            continue
        if a == "--log" and i + 1 < len(argv):
            out += ["--set", "log=" + argv[i + 1]]
            skip = True
            continue
        out.append(a)
    return out


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if args.nproc < 1:
        raise ConfigError(f"--nproc must be ≥ 1, got {args.nproc}")
    if args.nproc > 1 and not distributed.init_from_env():
        return distributed.launch(args.nproc, strip_nproc(sys.argv[1:]))
    distributed.init_from_env()
    metrics = train(cfg, resume=args.resume, stop_after_epoch=args.stop_after_epoch)
    if "stopped_after_epoch" in metrics and distributed.rank_world()[0] == 0:
        print(f"stopped after epoch {metrics['stopped_after_epoch']}; continue with --resume --out {cfg.out}")
        return 0
    if distributed.rank_world()[0] != 0:
        return 0
    split = metrics["eval_split"]
    print(f"{cfg.method}: {split} accuracy {accuracy_text(metrics[split + '_accuracy'], metrics.get('eval_n'))} "
          f"({metrics['train_seconds']:.1f} s training) -> {cfg.out}")
    return 0


def accuracy_text(accuracy: float, n: int | None) -> str:
    """``97.2 % [95.0, 98.5] (n = 360, 95 % Wilson interval)``; a bare percentage without n."""
    from ..stats import wilson_interval

    if not n:
        return f"{100 * accuracy:.1f} %"
    lo, hi = wilson_interval(round(accuracy * n), n)
    return f"{100 * accuracy:.1f} % [{100 * lo:.1f}, {100 * hi:.1f}] (n = {n}, 95 % Wilson interval)"
