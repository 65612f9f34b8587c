"""Disk cost of each artifact at the paper's shapes, measured by writing the real files' contents.

For every model of the paper's grid at CIFAR (32x32x3, 100 classes) and Tiny ImageNet (64x64x3,
200 classes) shapes, full width, seeded random weights (the size does not depend on training):

- teacher.pt / student.pt: what fit() writes at the end ({"best", "last", "best_epoch"}: two
  weight copies), saved with torch.save to a temporary file and measured;
- checkpoint.pt: what fit() keeps while training (model, AdamW state with two moments, scheduler,
  RNG): the model is stepped once on a random batch so the optimizer state exists, then saved;
- feature cache bytes per row (float16) for the teacher's baseline layer list, from the layer
  table (one dummy forward), and the size of the whole cache for the split's training images.

    python bench/bench_artifact_sizes.py                     # all datasets and models
    python bench/bench_artifact_sizes.py --datasets cifar100 --models resnet34 resnet9
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.layers.hooks import layer_infos  # noqa: E402
from common.models import MODELS, create_model  # noqa: E402

# name: (image size, classes, training images)
DATASETS = {"cifar100": (32, 100, 50_000), "tiny_imagenet": (64, 200, 100_000)}
TEACHERS = ("resnet34", "vgg19", "vit_b")
STUDENTS = ("resnet9", "vgg11", "mobilenetv2", "vit_ett")


def _saved_bytes(obj: object, tmp: Path) -> int:
    path = tmp / "obj.pt"
    torch.save(obj, path)
    return path.stat().st_size


def model_sizes(name: str, image_size: int, classes: int, tmp: Path) -> dict[str, float]:
    """Parameters (millions) and the MB of the final weights file and of a training checkpoint."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=classes, in_channels=3, image_size=image_size)
    params = sum(p.numel() for p in model.parameters())
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    weights = _saved_bytes({"best": state, "last": model.state_dict(), "best_epoch": 1}, tmp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=10)
    x = torch.randn(2, 3, image_size, image_size)
    torch.nn.functional.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    opt.step()
    sched.step()
    ckpt = _saved_bytes(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": torch.get_rng_state()}, tmp
    )
    return {"params_M": params / 1e6, "weights_MB": weights / 1e6, "checkpoint_MB": ckpt / 1e6}


def baseline_row_bytes(name: str, image_size: int, classes: int) -> tuple[list[int], int]:
    """The teacher's baseline layers and their float16 bytes per cached row."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=classes, in_channels=3, image_size=image_size)
    table = layer_infos(model.eval(), (3, image_size, image_size))
    layers = list(MODELS.get(name).baseline_layers)
    return layers, sum(table[i].dim for i in layers) * 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--models", nargs="+", default=[*TEACHERS, *STUDENTS])
    args = ap.parse_args()
    print("| dataset | model | params | teacher.pt / student.pt | checkpoint.pt (while training) | cache per row, baseline layers (float16) | cache, all training images |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for ds in args.datasets:
            size, classes, n_train = DATASETS[ds]
            for name in args.models:
                s = model_sizes(name, size, classes, tmp)
                cache = "-"
                total = "-"
                if name in TEACHERS:
                    layers, row = baseline_row_bytes(name, size, classes)
                    cache = f"{row / 1e3:.0f} kB (layers {', '.join(map(str, layers))})"
                    total = f"{row * n_train / 1e9:.1f} GB"
                print(f"| {ds} | {name} | {s['params_M']:.1f} M | {s['weights_MB']:.0f} MB | {s['checkpoint_MB']:.0f} MB | {cache} | {total} |", flush=True)


if __name__ == "__main__":
    main()
