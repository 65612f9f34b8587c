#!/usr/bin/env python3
"""Stage 2: distil a student from the teacher's cached features, once per seed.

Runs that finished are skipped, interrupted runs resume from their checkpoint. A missing teacher
or profile is built first (stage 1), under a lock, so shell loops over pairs can share one.

Examples:
  python stage2_distill.py --config configs/demo.yaml --method ours --seeds "0 1 2"
  python stage2_distill.py --teacher resnet34 --student resnet9 --method kd train.epochs=5
  torchrun --standalone --nproc_per_node=4 stage2_distill.py --config configs/cifar100.yaml --method ours
    (one run on 4 GPUs with DDP; train.batch_size stays the global batch; `make distill NPROC=4`)
"""
from __future__ import annotations

import logging

from common import cli


def body() -> int:
    p = cli.parser(__doc__)
    p.add_argument("--student", default=None, help="student model name (sets student.name), e.g. resnet9, vgg11, mobilenetv2, vit_ett")
    p.add_argument("--method", default=None, help="method name (sets method.name); --list-methods shows them")
    p.add_argument("--seeds", default=None, help='seeds to run, e.g. --seeds "0 1 2" or --seeds 0,1,2 (sets seeds)')
    p.add_argument("--list-methods", action="store_true", help="print the registered methods and exit")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue interrupted runs from their last epoch's checkpoint (the default)")
    mode.add_argument("--restart", action="store_true", help="discard the checkpoints of unfinished runs and train them from epoch 1")
    args = p.parse_intermixed_args()
    if args.list_methods:
        from common.methods import METHODS

        width = max(map(len, METHODS.names()))
        print("\n".join(f"{name:<{width}}  {METHODS.get(name).summary}" for name in METHODS.names()))
        return 0
    cfg = cli.build_config(args, {"student": "student.name", "method": "method.name"})  # --seeds too

    from common.train import distributed
    from common.distill import run  # checks the whole config before any work

    ranks = distributed.from_env()  # torchrun --nproc_per_node=N: one run on N processes
    if not ranks.is_main:
        logging.getLogger("kd").setLevel(logging.WARNING)  # rank 0 reports for all
    try:
        results = run(cfg, restart=args.restart, ranks=ranks)
    finally:
        distributed.finish()
    if not ranks.is_main:
        return 0
    for r in results:
        state = "skipped (finished)" if r.skipped else f"best test accuracy {r.best_test_acc:.2f}%"
        print(f"seed {r.seed}: {state}  {r.dir}")
    return 0


if __name__ == "__main__":
    cli.main(body)
