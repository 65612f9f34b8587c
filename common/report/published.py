"""Published CIFAR-100 top-1 for the standard KD pairs, so stage 3 can put it beside the user's.

A researcher places a method against the field's tables (CRD, ICLR 2020, Tables 1-2; DKD, CVPR
2022), not only against runs of their own. The numbers ship with the package as
`published_cifar100.csv` (facts with their citations, one source per row, so the repository
stands on its own); this module reads it once and answers: what was published for this
dataset, teacher, student and method of ours; which published method is a pair's best; and is a
user's own control run (ce, kd) far enough from its published number to point at another recipe?
Pure lookups, no torch.

Only what is the same experiment matches: dataset `cifar100`, both models of the CIFAR KD zoo
(`cifar:<name>`, the RepDistiller architectures the tables were measured on), and a method of
this tool that is the published method (`PUBLISHED_METHOD`).
"""
from __future__ import annotations

import csv
import functools
from pathlib import Path
from typing import NamedTuple

PUBLISHED_CSV = Path(__file__).with_name("published_cifar100.csv")
DATASET = "cifar100"  # common.data.registry's name for CIFAR-100 (fine labels), the tables' dataset
ZOO_PREFIX = "cifar:"  # common.models.cifar.PREFIX; not imported, because that package imports torch

# This tool's method name -> the name in the published tables. Only methods whose loss and weights
# are the published ones:
#   teacher, ce: the teacher alone and the student trained with CE alone ("student" in the tables);
#   kd: Hinton et al.'s KD at T 4 (our CE + 16 x KL; RepDistiller's row weighs 0.1 CE + 0.9 KD:
#       the same loss terms, a different balance, so a gap of a few tenths is expected);
#   sp: Tung & Mori's row-normalised Gram loss, CE + 3000 x SP, no KD (RepDistiller's -b 3000);
#   crd: CRD at weight 0.8 with no KD (RepDistiller -a 0 -b 0.8; the tables' "CRD", not "CRD+KD");
#   dkd: DKD (TCKD + NCKD) with the paper's per-pair beta.
# Deliberately left out (a number beside them would compare different methods):
#   fitnet (and fitnet_nokd, fitnet_fc): the paper-under-study's "Base FKD", projected MSE on
#       several baseline layers + CE + KD, not FitNets' hint training of one intermediate layer
#       that the tables' "FitNet" row is;
#   sp_ref: the reference's cosine-matrix MSE + KD (the paper-under-study's "Sim. Pres."), not
#       Tung & Mori's loss;
#   kd_std: logit-standardised KD is not in these tables;
#   semckd, simkd: not in CRD's or DKD's tables (their own papers use other settings);
#   ours and its variants: the method under study, nothing is published.
PUBLISHED_METHOD = {"teacher": "teacher", "ce": "student", "kd": "KD", "sp": "SP", "crd": "CRD", "dkd": "DKD"}


# Rows of the tables that are no distillation method: the teacher and the student trained alone.
# They never count as "the best published method" of a pair.
NOT_A_METHOD = ("teacher", "student")
# Our methods whose own runs are checked against the published number (`differs_from_published`):
# ce and kd are the recipe's control runs, the same loss as the tables' "student" and "KD" rows.
RECIPE_CHECKED = ("ce", "kd")
# A user's ce or kd mean more than this many points from the published number is flagged as a sign
# that the recipe or the data differ from the benchmark's. A judgement, not a statistic of the
# tables: the CRD and DKD tables as shipped (the RepDistiller and mdistiller READMEs) give means
# without their spread, so the seed std is not theirs to quote. 1 point is a few times the seed std
# these CIFAR-100 students usually show (a few tenths of a point in papers that print mean ± std
# over seeds), and above the few tenths our kd's different CE/KD balance may cost (see PUBLISHED_METHOD),
# so a larger gap is unlikely to be seed noise alone. The same size as stats.HEADROOM_MIN_POINTS.
RECIPE_GAP_POINTS = 1.0
BENCHMARK_CONFIG = "configs/cifar100_kd_benchmark.yaml"  # the benchmark's recipe, named in the flag


class Published(NamedTuple):
    top1: float  # CIFAR-100 test top-1, %
    source: str  # the row's citation, as shipped


@functools.lru_cache(maxsize=1)
def published_table(path: Path = PUBLISHED_CSV) -> dict[tuple[str, str, str], Published]:
    """(teacher, student, published method) -> Published, from the shipped CSV (read once).

    Lines starting with '#' are the file's header comment (where the numbers come from)."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = csv.DictReader(line for line in handle if not line.startswith("#"))
        return {(r["teacher"], r["student"], r["method"]): Published(float(r["top1"]), r["source"]) for r in rows}


def zoo_name(model: str) -> str | None:
    """'cifar:resnet32x4' -> 'resnet32x4' (the tables' name); None for a model outside the zoo,
    whose architecture the tables never measured even when its name looks alike."""
    return model[len(ZOO_PREFIX):] if model.startswith(ZOO_PREFIX) else None


def published_method(method: str) -> str | None:
    """This tool's method name -> the tables' name; None where no published method is the same."""
    return PUBLISHED_METHOD.get(method)


def published_top1(dataset: str, teacher: str, student: str, method: str) -> Published | None:
    """The published number for one row of the accuracy table (our model and method names), or
    None: another dataset, a model outside the zoo, a non-standard pair or an unmatched method."""
    names = (zoo_name(teacher), zoo_name(student), published_method(method))
    if dataset != DATASET or None in names:
        return None
    return published_table().get(names)  # type: ignore[arg-type]  (no None left in names)


def numbered_sources(sources: list[str]) -> dict[str, int]:
    """Each distinct source -> its footnote number, 1-based, in order of first appearance."""
    numbers: dict[str, int] = {}
    for source in sources:
        numbers.setdefault(source, len(numbers) + 1)
    return numbers


def best_published_method(dataset: str, teacher: str, student: str) -> tuple[str, Published] | None:
    """The best published distillation method of a pair (our model names): the tables' method name
    and its number, highest top-1 among the shipped rows other than `NOT_A_METHOD` (a tie goes to
    the first name in alphabetical order); None off the benchmark. The shipped methods hold the best
    of both tables: CRD tops every column of CRD's tables, and DKD's row is its paper's own."""
    names = (zoo_name(teacher), zoo_name(student))
    if dataset != DATASET or None in names:
        return None
    rows = [(method, found) for (t, s, method), found in published_table().items()
            if (t, s) == names and method not in NOT_A_METHOD]
    return min(rows, key=lambda row: (-row[1].top1, row[0])) if rows else None


def differs_from_published(mean: float, published: float, threshold: float = RECIPE_GAP_POINTS) -> bool:
    """|mean - published| > `threshold` points (`RECIPE_GAP_POINTS`). The published numbers carry
    two decimals, so the difference is rounded to 1e-9 first: 63.01 against 64.01 is 1 point, not
    the 1.000000000000007 of binary floats, and is not flagged."""
    return round(abs(mean - published), 9) > threshold
