#!/usr/bin/env python3
"""Images/s of the project's training loop (common.train.loop.fit) against a plain PyTorch loop.

Goal of issue 9: fit >= 0.95 of the plain loop, as teacher training and as a CE student. The
plain loop is the torchvision reference recipe stripped to its core: the same model (same
seed, same init), the same batch size, AdamW with the same LR and weight decay, OneCycle
stepped per batch, and per step only zero_grad / forward / cross-entropy / backward / step on
batches sliced from images already normalized into one float32 tensor. fit does what it does
per step in the project (uint8 -> float normalization of the batch, the NaN check, the loss and
accuracy sums kept on the device, the Distiller's loss dict, the progress bar when enabled).

Both run in this one process, interleaved over repeats, one epoch each, fresh model each time;
the figures are medians. fit's images/s is its training part (metrics.csv images_per_s: no
evaluation, no checkpoint), the plain loop's the same span.

  python bench/bench_train_loop.py --repeats 5                  # demo size (configs/demo.yaml)
  python bench/bench_train_loop.py --size cifar --repeats 3     # 32x32x3, 100 classes, full width
  python bench/bench_train_loop.py --size cifar --compile       # also fit with train.compile=true

--compile adds fit with train.compile=true (common/train/compiled.py: CUDA graphs on CUDA) and
its images/s against eager fit's; the warm-up run before the timed ones pays the build, which later
runs of a new model of the same class reuse.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench_epoch import DEFAULT_CONFIG, cifar_overrides  # noqa: E402  (bench/ is this script's sys.path[0])
from bench_profile_scale import write_cifar100  # noqa: E402
from common.config import Config, MethodConfig, ModelConfig, TrainConfig, load_config  # noqa: E402
from common.data.registry import Data, load_data  # noqa: E402
from common.methods import build_distiller, resolve_method  # noqa: E402
from common.models import MODELS, create_model  # noqa: E402
from common.runtime import resolve_device  # noqa: E402
from common.train.loop import fit  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Role:
    """One model trained with CE: the teacher (teacher_train settings) or the CE student (train)."""

    name: str
    model: ModelConfig
    train: TrainConfig
    lr: float


def roles(cfg: Config) -> list[Role]:
    teacher_lr = cfg.teacher_train.lr if cfg.teacher_train.lr is not None else MODELS.get(cfg.teacher.name).lr_ce
    student_lr = cfg.train.lr if cfg.train.lr is not None else MODELS.get(cfg.student.name).lr_ce
    return [
        Role(f"teacher {cfg.teacher.name} x{cfg.teacher.width:g}", cfg.teacher, cfg.teacher_train, teacher_lr),
        Role(f"ce student {cfg.student.name} x{cfg.student.width:g}", cfg.student, cfg.train, student_lr),
    ]


def new_model(role: Role, data: Data, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(role.model.name, num_classes=data.num_classes, in_channels=data.in_channels, image_size=data.image_size, width=role.model.width)


def run_fit(role: Role, data: Data, rows: torch.Tensor, seed: int, compile: bool = False) -> float:
    """Images/s of one epoch of common.train.loop.fit (its own measurement of the training part);
    `compile`: with train.compile=true."""
    model = new_model(role, data, seed)
    ce = build_distiller(
        resolve_method(MethodConfig(name="ce")), model, num_classes=data.num_classes,
        input_shape=(data.in_channels, data.image_size, data.image_size), teacher_layers=[], student_layers=[], teacher_shapes={},
    )
    cfg = dataclasses.replace(role.train, epochs=1, seed=seed, progress=False)
    if hasattr(cfg, "tracker"):
        cfg = dataclasses.replace(cfg, tracker="none")
    if compile:
        cfg = dataclasses.replace(cfg, compile=True)
    with tempfile.TemporaryDirectory() as tmp:
        result = fit(ce, data, cfg, Path(tmp), lr=role.lr, train_indices=rows, weights_of=model)
    return float(result.metrics["images_per_s"].iloc[0])


def run_plain(
    role: Role, data: Data, images: torch.Tensor, labels: torch.Tensor, seed: int, channels_last: bool = False, amp: bool = False
) -> float:
    """Images/s of one epoch of the plain loop on pre-normalized float images (drop_last, shuffled).

    channels_last: the model's weights (and so its activations) in NHWC, as
    `model.to(memory_format=torch.channels_last)` in the torchvision recipe's spirit; the
    input batch stays NCHW (the first convolution takes the weights' layout).
    amp: the forward under bfloat16 autocast, as fit runs it on CUDA (train.amp), so that the
    two loops do the same arithmetic there.
    """
    device = images.device
    model = new_model(role, data, seed).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    cfg = role.train
    steps = len(labels) // cfg.batch_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=role.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=role.lr, total_steps=steps, pct_start=cfg.pct_start)
    model.train()
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).to(device)
    _sync(device)
    tic = time.perf_counter()
    for step in range(steps):
        idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        x, y = images[idx], labels[idx]
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        scheduler.step()
    _sync(device)
    return steps * cfg.batch_size / (time.perf_counter() - tic)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(DEFAULT_CONFIG), default="demo")
    p.add_argument("--config", default=None, help="default: configs/demo.yaml (demo), configs/cifar100.yaml (cifar)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--images", type=int, default=None, help="training images per epoch for both roles (default: each role's train_subset)")
    p.add_argument("--n-train", type=int, default=2000, help="cifar: generated training images")
    p.add_argument("--other-layout", action="store_true", help="also time the plain loop in the other memory layout (NCHW when train.channels_last is on, else NHWC)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice); 1 is steadier on a loaded machine")
    p.add_argument("--compile", action="store_true", help="also time fit with train.compile=true (torch.compile of the step) against eager fit")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as data_tmp:
        overrides = list(args.overrides)
        if args.size == "cifar":
            write_cifar100(Path(data_tmp), args.n_train, 200, classes=100)
            overrides = cifar_overrides(Path(data_tmp), args.n_train) + overrides
        config = args.config or DEFAULT_CONFIG[args.size]
        cfg = load_config(config, overrides)
        data = load_data(cfg.dataset)
        bench(cfg, data, args.repeats, args.images, args.other_layout, f"{args.size} size ({config}, threads {torch.get_num_threads()})", args.compile)


def bench(cfg: Config, data: Data, repeats: int, images: int | None, other_layout: bool, title: str, compiled: bool = False) -> None:
    """The plain loop uses fit's memory layout (train.channels_last), so fit / plain measures the
    loop alone; `other_layout` adds the plain loop in the other layout, which measures the layout;
    `compiled` adds fit with train.compile=true, against eager fit."""
    variants = ["fit", "plain"] + (["plain, other layout"] if other_layout else []) + (["fit, compiled"] if compiled else [])
    print(f"\n{title}: training images/s, median of {repeats} interleaved one-epoch runs:")
    extra = " plain in the other layout img/s | fit's layout / other (plain loops) |" if other_layout else ""
    extra += " fit compiled img/s | compiled / eager fit (median of the repeats' ratios) |" if compiled else ""
    print(f"| model | layout | images | batch | fit img/s (median) | plain img/s (median) | fit / plain (median of the repeats' ratios) | each repeat's ratio |{extra}")
    print("|---|---|---|---|---|---|---|---|" + ("---|---|" if other_layout else "") + ("---|---|" if compiled else ""))
    for role in roles(cfg):
        layout = "NHWC" if role.train.channels_last else "NCHW"
        subset = images if images is not None else role.train.train_subset
        rows = data.training_subset(subset, cfg.dataset.split_seed)
        device = resolve_device(role.train.device)
        x_all = data.normalize(data.train.images[rows], device)  # the same normalization as fit's per batch
        y_all = data.train.labels[rows].to(device)
        ips: dict[str, list[float]] = {v: [] for v in variants}

        def run(variant: str, seed: int) -> float:
            if variant in ("fit", "fit, compiled"):
                return run_fit(role, data, rows, seed, compile=variant == "fit, compiled")
            return run_plain(role, data, x_all, y_all, seed, channels_last=role.train.channels_last != (variant == "plain, other layout"),
                             amp=role.train.amp and device.type == "cuda")

        for variant in variants:  # warm-up (allocator, oneDNN primitives, the compiled step's build), not counted
            run(variant, seed=100)
        for rep in range(repeats):
            # alternate the order, so a drift in machine load favours none
            for variant in variants if rep % 2 == 0 else variants[::-1]:
                ips[variant].append(run(variant, seed=rep))
        med = {v: statistics.median(x) for v, x in ips.items()}
        ratios = [a / b for a, b in zip(ips["fit"], ips["plain"])]
        row = (f"| {role.name} | {layout} | {len(rows)} | {role.train.batch_size} | {med['fit']:.0f} | {med['plain']:.0f} | "
               f"{statistics.median(ratios):.3f} | {', '.join(f'{r:.2f}' for r in ratios)} |")
        if other_layout:
            layout_ratios = [a / b for a, b in zip(ips["plain"], ips["plain, other layout"])]
            row += f" {med['plain, other layout']:.0f} | {statistics.median(layout_ratios):.3f} |"
        if compiled:
            compile_ratios = [a / b for a, b in zip(ips["fit, compiled"], ips["fit"])]
            row += f" {med['fit, compiled']:.0f} | {statistics.median(compile_ratios):.3f} |"
        print(row, flush=True)


if __name__ == "__main__":
    main()
