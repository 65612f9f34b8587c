"""Shared command-line plumbing for the stage scripts: config + flags + `key=value` overrides."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import Callable, NoReturn

from common.config import Config, load_config
from common.errors import UserError

OVERRIDE_HELP = "config overrides as section.key=value, e.g. train.epochs=5 teacher.width=0.25 'seeds=[0,1,2]'"


class Parser(argparse.ArgumentParser):
    """argparse whose errors are `UserError`s, so a bad flag gives one `error:` line (exit 2) like
    every other bad input, instead of a usage block. Stage scripts parse with
    `parse_intermixed_args`, so overrides and flags mix in any order."""

    def __init__(self, description: str) -> None:
        super().__init__(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message: str) -> NoReturn:
        raise UserError(f"{message}; see {self.prog} --help")


def parser(description: str) -> Parser:
    p = Parser(description)
    p.add_argument("--config", default=None, help="YAML config (a short diff from the defaults in common/config.py)")
    p.add_argument("--dataset", default=None, help="dataset name (sets dataset.name), e.g. fashion_mnist, cifar10, cifar100, tiny_imagenet, image_folder")
    p.add_argument("--data-root", default=None, help="local dataset directory (sets dataset.root)")
    p.add_argument("--teacher", default=None, help='teacher model name (sets teacher.name), e.g. resnet34, vgg19, vit_b; several: --teacher "resnet34 vgg19" (sets teachers)')
    p.add_argument("--artifacts", default=None, help="artifacts directory (sets artifacts)")
    p.add_argument("--quiet", action="store_true", help="no progress bars, only the summary lines")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDE_HELP)
    return p


def build_config(args: argparse.Namespace, flag_keys: dict[str, str]) -> Config:
    """Config from --config, then the flags in `flag_keys` (attr -> config key), then overrides."""
    overrides = []
    # --seeds "0 1 2" / 0,1,2 goes in as a string too: the config parses integer lists in one place.
    flags = {"dataset": "dataset.name", "data_root": "dataset.root", "teacher": "teacher.name", "artifacts": "artifacts", "seeds": "seeds", **flag_keys}
    for attr, key in flags.items():
        value = getattr(args, attr, None)
        if attr == "teacher" and value is not None and len(value.split()) > 1:  # --teacher "resnet34 vgg19": several teachers
            key, value = "teachers", value.split()
        if value is not None:  # quoted: a flag's value is a string even when it looks like YAML ("yes", "1e3", "a: b")
            overrides.append(f"{key}={json.dumps(value)}")
    overrides += list(args.overrides)
    if getattr(args, "quiet", False):  # stage 3 has no progress bars, so no --quiet
        overrides += ["train.progress=false", "teacher_train.progress=false", "profile.progress=false"]
    return load_config(args.config, overrides)


class Terminated(KeyboardInterrupt):
    """SIGTERM (`timeout`, `kill`, a batch scheduler), raised in the main thread like Ctrl-C so
    that every writer's cleanup runs: temp files removed, locks released, old artifacts kept."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    # One clean exit per process: a second SIGTERM while the cleanup runs is ignored, so it
    # cannot cut the cleanup short (SIGKILL still can; the next writer removes what is left).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated()


def install_sigterm_handler() -> None:
    """Turn SIGTERM into `Terminated` (a KeyboardInterrupt) in this process."""
    signal.signal(signal.SIGTERM, _on_sigterm)


def _rank_tag() -> str:
    """' (rank N)' under torchrun, where every rank prints its own error line; '' otherwise."""
    return f" (rank {os.environ.get('RANK', '0')})" if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else ""


def main(body: Callable[[], int | None]) -> None:
    """Run a stage: user errors become one `error:` line and exit code 2; Ctrl-C (130) and
    SIGTERM (143) one `interrupted:` line after the writers removed their temp files."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    install_sigterm_handler()
    try:
        code = body()
    except UserError as exc:
        print(f"error{_rank_tag()}: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as exc:
        how, status = ("terminated (SIGTERM)", 143) if isinstance(exc, Terminated) else ("Ctrl-C", 130)
        print(f"interrupted: {how}; finished artifacts are kept and partial ones removed; rerun the same command to resume", file=sys.stderr)
        sys.exit(status)
    except (OSError, RuntimeError) as exc:
        # A write that no atomic writer wraps (a marker file, a plot) on a full disk: one line too.
        from common.files import is_disk_full, mount_point

        filename = getattr(exc, "filename", None)
        where = Path(filename).parent if filename else Path.cwd()
        if not is_disk_full(exc, where):
            raise
        mount = mount_point(where)
        target = f" writing {filename}" if filename else ""
        print(f"error: disk full{target} (no space left on {mount}); free space on {mount} or pass artifacts=DIR on another disk, then rerun", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
