"""Evaluate a RobustBench-style CIFAR-10 model with gradreg's harness.

With a RobustBench checkpoint on disk (MODEL_DIR/cifar10/Linf/Wong2020Fast.pt, as RobustBench
stores it; the robustbench package is optional)::

    python examples/evaluate_robustbench_model.py --model-dir models --data cifar10 --n 500

Without one, a randomly initialised PreAct ResNet-18 of the same layout stands in (accuracies
then sit at chance), and ``--data`` may be any data gradreg reads (e.g. a .npz file).
"""
import argparse

import gradreg
from gradreg import loading

parser = argparse.ArgumentParser()
parser.add_argument("--name", default="Wong2020Fast")
parser.add_argument("--model-dir", default="models")
parser.add_argument("--data", default="cifar10", help="registered set, folder or .npz/.safetensors (3×32×32)")
parser.add_argument("--data-dir", default=None)
parser.add_argument("--n", type=int, default=200, help="test points")
parser.add_argument("--steps", type=int, default=20, help="PGD steps")
args = parser.parse_args()

path = loading.robustbench_path(args.name, model_dir=args.model_dir, dataset="cifar10", threat_model="Linf")
if path.is_file():
    model = loading.robustbench_model(args.name, model_dir=args.model_dir)  # eval mode
else:
    print(f"{path} not found: evaluating a random-weight PreAct ResNet-18 instead")
    model = gradreg.models.make("preact-resnet18", mean=loading.CIFAR10_MEAN, std=loading.CIFAR10_STD).eval()

bundle = gradreg.data.load_test(args.data, data_dir=args.data_dir)  # a file is all test data
x, y = bundle.test_x[:args.n], bundle.test_y[:args.n]
threat = gradreg.ThreatModel("linf", 8 / 255, bundle.bounds)
result = gradreg.evaluate(model, x, y, threat, attacks=["fgsm", "pgd"], steps=args.steps)
print(result.summary())
