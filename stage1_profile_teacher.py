#!/usr/bin/env python3
"""Stage 1: train (if needed) and profile a teacher: generalized layers, S/I/E/Q per layer
(streamed, memory bounded by profile.memory_budget_mb), top-k selection, the manifest
profile.yaml that stage 2 reads, and the HDF5 feature cache that stage 2 distils from.

Examples:
  python stage1_profile_teacher.py --config configs/demo.yaml
  python stage1_profile_teacher.py --teacher resnet34 --list-layers
  python stage1_profile_teacher.py --dataset cifar10 --data-root ~/data --teacher vgg19 profile.k=4
"""
from __future__ import annotations

from common import cli


def body() -> int:
    p = cli.parser(__doc__)
    p.add_argument("--list-layers", action="store_true", help="print the teacher's generalized layers (index, module, shape, bytes) and exit")
    p.add_argument("--train-only", action="store_true", help="only train the teacher (make teacher)")
    args = p.parse_intermixed_args()
    cfg = cli.build_config(args, {})

    from common.checks import load_data_checked
    from common.data.registry import load_data
    from common.layers.tables import list_layers
    from common.profile.features import no_cache_reason
    from common.profile.runner import run
    from common.profile.teacher import ensure_teacher
    from common.profile import multi

    if multi.is_multi(cfg):  # --teacher "A B": every teacher, then the pooled manifest
        return _several(cfg, args)
    if args.list_layers:  # writes nothing; the profile settings may be what the listing is for
        print(list_layers(cfg, load_data(cfg.dataset)).to_string(index=False))
        return 0
    data = load_data_checked(cfg)  # the whole config, before a teacher is built or a file written
    if args.train_only:
        print(ensure_teacher(cfg, data))
        return 0
    profile = run(cfg, data)
    cols = ["layer", "module", "shape", "S", "I", "E", "Q", "selected"]
    print(profile.quality[cols].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"selected teacher layers: {profile.selected}")
    print(f"profile: {profile.dir / 'profile.yaml'}")
    print(f"feature cache: {profile.features or f'none ({no_cache_reason(cfg, data)}): students use the live teacher'}")
    return 0


def _several(cfg, args) -> int:
    """The same three modes for several teachers: each teacher's layers, each teacher trained, or
    every profile and the multi-teacher manifest (common/profile/multi.py)."""
    import pandas as pd

    from common.checks import load_data_checked
    from common.data.registry import load_data
    from common.layers.tables import list_layers
    from common.profile import multi
    from common.profile.teacher import ensure_teacher

    configs = [multi.config_of(cfg, t) for t in multi.teacher_configs(cfg)]
    if args.list_layers:
        data = load_data(cfg.dataset)
        for c in configs:
            print(f"{c.teacher.name}:\n{list_layers(c, data).to_string(index=False)}")
        return 0
    data = load_data_checked(configs[0])
    if args.train_only:
        for c in configs[1:]:
            load_data_checked(c, data)
        for c in configs:
            print(ensure_teacher(c, data))
        return 0
    manifest = multi.run(cfg, data)
    table = pd.DataFrame(manifest.data["layers"])[["name", "index", "module", "S", "I", "E", "Q"]]
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    for rule in multi.RULES:
        chosen = (manifest.data["selections"].get(rule) or {}).get(manifest.data["criterion"])
        print(f"{rule} top-{manifest.data['k']} by {manifest.data['criterion']}: {multi.describe(manifest.names, chosen) if chosen else 'none'}")
    print(f"manifest: {manifest.dir / multi.MANIFEST}")
    return 0


if __name__ == "__main__":
    cli.main(body)
