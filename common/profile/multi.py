"""Several teachers (config `teachers: [...]`): each profiled on its own, their layers selected together.

Stage 1 profiles every listed teacher with the single-teacher pipeline (common/profile/runner.py)
into its own teacher directory, so a teacher profiled for a pair run and then for a single run
is profiled once, and m teachers cost m single profiles. It then writes one multi-teacher
manifest, the (teacher, layer, S, I, E, Q) table of all of them with the selections stage 2 reads:

    <artifacts>/<dataset>/<A>+<B>-<mhash>/profile.yaml   (mhash: the teachers' ids and the profile key)

Every entry comes from the same subsets A and B of the same dataset (the profile key is the same
for every teacher), which is what puts the teachers' scores side by side (docs/method.md says how far
they are on one scale).

Selection rules (`teacher_rule`): `pooled`, the top-k by the criterion over all teachers' layers;
`per_teacher`, the top k/m of each of the m teachers (the first k mod m teachers take one more).
The word "baseline" takes half of each teacher's baseline list (`baseline_pairs`). Stage 2 pairs
the k selected (teacher, layer) entries with k student layers in depth order (`pair_in_depth_order`).

One teacher (`teachers: []` or one entry) is today's single-teacher config (`single_config`):
same keys, same directories, same results.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from common.config import CRITERIA, Config, TeacherConfig, from_dict, short_hash
from common.errors import CacheError, ConfigError, DataError
from common.layers import pairing

log = logging.getLogger("kd")

MANIFEST = "profile.yaml"
RULES = ("pooled", "per_teacher")
NAME_SEP = "+"  # <A>+<B>: the teachers' directory and pair names; registry names never hold it


# ----------------------------------------------------------------------------- config


def teacher_configs(cfg: Config) -> list[TeacherConfig]:
    """The teachers of `cfg`, each with its own section values; [cfg.teacher] without `teachers`.

    A name takes the `teacher` section's width and finetune (and its checkpoint when it is that
    section's own teacher); a mapping sets any of name, width, pretrained and finetune. Refused:
    a teacher named twice, and one checkpoint given to several teachers of other names.
    """
    if not cfg.teachers:
        return [cfg.teacher]
    out = []
    for i, entry in enumerate(cfg.teachers):
        if isinstance(entry, str):
            if cfg.teacher.pretrained is not None and entry != cfg.teacher.name and len(cfg.teachers) > 1:
                raise ConfigError(f"teachers[{i}]={entry} would take teacher.pretrained={cfg.teacher.pretrained}, another model's "
                                  f"checkpoint; give each teacher its own: teachers=[{{name: {entry}, pretrained: PATH}}, ...]")
            out.append(dataclasses.replace(cfg.teacher, name=entry))
        elif isinstance(entry, dict):
            base = {**dataclasses.asdict(cfg.teacher), "pretrained": None}
            out.append(from_dict(TeacherConfig, {**base, **entry}, f"teachers[{i}]"))
        else:
            raise ConfigError(f"teachers[{i}] is {entry!r}; give a model name or a mapping with name, width, pretrained, finetune")
    check_distinct(out)
    return out


def check_distinct(teachers: Sequence[TeacherConfig]) -> None:
    """The same teacher twice would put one teacher's layers in both halves of a selection. Its
    identity is what keys its directory: finetune tells two teachers apart only with a checkpoint."""
    seen: dict[tuple[Any, ...], int] = {}
    for i, t in enumerate(teachers):
        key = (t.name, t.width, t.pretrained, t.finetune if t.pretrained is not None else None)
        if key in seen:
            raise ConfigError(f"teachers names {t.name} twice (entries {seen[key]} and {i}); list each teacher once")
        seen[key] = i


def is_multi(cfg: Config) -> bool:
    return len(teacher_configs(cfg)) > 1


def single_config(cfg: Config) -> Config:
    """`cfg` as a single-teacher config: a one-entry `teachers` becomes `teacher`, so it keeps
    today's keys and directories (the config.yaml it writes has no trace of the list either)."""
    teachers = teacher_configs(cfg)
    if len(teachers) > 1:
        raise ConfigError(f"{len(teachers)} teachers where one is expected")
    return dataclasses.replace(cfg, teacher=teachers[0], teachers=[])


def config_of(cfg: Config, teacher: TeacherConfig) -> Config:
    """The single-teacher config of one of the teachers: its directories are a single run's."""
    return dataclasses.replace(cfg, teacher=teacher, teachers=[])


def joined_name(cfg: Config) -> str:
    """<A>+<B>: the teachers in a directory name (the pair directory of a multi-teacher run)."""
    return NAME_SEP.join(t.name for t in teacher_configs(cfg))


def validate(cfg: Config, n_layers: Sequence[int]) -> None:
    """The multi-teacher settings that need the teachers' layer counts, checked before any training."""
    m = len(n_layers)
    k = cfg.profile.k
    if cfg.profile.layers:
        raise ConfigError(f"profile.layers={cfg.profile.layers} names one teacher's layers; with {m} teachers select by "
                          "profile.criterion (remove profile.layers)")
    if k < 1 or k > sum(n_layers):
        raise ConfigError(f"profile.k={k} but the {m} teachers have {sum(n_layers)} generalized layers in all; choose 1..{sum(n_layers)}")
    if cfg.teacher_rule == "per_teacher" and k < m:
        raise ConfigError(f"teacher_rule=per_teacher takes k/m layers from each of the m={m} teachers, but profile.k={k} < {m}; "
                          f"set profile.k to at least {m} or use teacher_rule=pooled")


# ----------------------------------------------------------------------------- selection (pure)

Pair = tuple[int, int]  # (teacher position in `teachers`, teacher layer index)


def _ranked(rows: Sequence[Mapping[str, Any]], criterion: str) -> list[tuple[float, int]]:
    """(score, layer) of the layers with a finite score, best first; ties go to the lower layer."""
    scored = [(float(r[criterion]), int(r["index"])) for r in rows if isinstance(r.get(criterion), (int, float))
              and math.isfinite(float(r[criterion]))]
    return sorted(scored, key=lambda item: (-item[0], item[1]))


def select_pooled(tables: Sequence[Sequence[Mapping[str, Any]]], k: int, criterion: str = "Q") -> list[Pair]:
    """The top-k (teacher, layer) entries by `criterion` over all teachers' layers (undefined
    scores never selected); ties go to the earlier teacher, then the lower layer. Sorted."""
    scored = [(score, t, layer) for t, rows in enumerate(tables) for score, layer in _ranked(rows, criterion)]
    if k > len(scored):
        raise DataError(f"k={k} but only {len(scored)} teacher layers have a finite {criterion}; lower profile.k")
    return sorted((t, layer) for _, t, layer in sorted(scored, key=lambda s: (-s[0], s[1], s[2]))[:k])


def quotas(k: int, m: int) -> list[int]:
    """k/m layers per teacher; the first k mod m teachers take one more."""
    if k < m:
        raise ConfigError(f"teacher_rule=per_teacher needs k >= the number of teachers ({m}), got k={k}; raise profile.k or use pooled")
    return [k // m + (1 if t < k % m else 0) for t in range(m)]


def select_per_teacher(tables: Sequence[Sequence[Mapping[str, Any]]], k: int, criterion: str = "Q") -> list[Pair]:
    """The top k/m layers of each of the m teachers by `criterion` (`quotas`). Sorted."""
    out: list[Pair] = []
    for t, (rows, quota) in enumerate(zip(tables, quotas(k, len(tables)))):
        ranked = _ranked(rows, criterion)
        if quota > len(ranked):
            raise DataError(f"teacher {t} has only {len(ranked)} layers with a finite {criterion}, fewer than its {quota}; lower profile.k")
        out += [(t, layer) for _, layer in ranked[:quota]]
    return sorted(out)


def baseline_pairs(baselines: Sequence[Sequence[int]], k: int) -> list[Pair]:
    """Half of each teacher's baseline list (k/m of each, `quotas`): teacher t takes the entries
    at positions t, t+m, t+2m... of its list, so the teachers share the depths rather than one
    taking the shallow half and the other the deep half. Sorted."""
    m = len(baselines)
    out: list[Pair] = []
    for t, (layers, quota) in enumerate(zip(baselines, quotas(k, m))):
        order = [layers[j] for j in range(t % max(1, len(layers)), len(layers), m)] + [x for j, x in enumerate(layers) if j % m != t % m]
        if quota > len(layers):
            raise ConfigError(f"teacher {t}'s baseline list {list(layers)} has fewer than {quota} layers; lower profile.k")
        out += [(t, int(layer)) for layer in order[:quota]]
    return sorted(out)


def pair_in_depth_order(pairs: Sequence[Pair], n_layers: Sequence[int], student_layers: Sequence[int]) -> list[tuple[int, int, int]]:
    """(teacher, teacher layer, student layer): the selected entries sorted by relative depth
    (layer + 1) / n_layers within their own teacher, paired one-to-one with the student layers
    sorted by index. Ties in relative depth go deeper: the entry of the larger layer index (the
    deeper network's) takes the deeper student layer, then the later teacher.

    Refused: a student layer claimed twice, and a count that does not match."""
    students = [int(j) for j in student_layers]
    twice = sorted({j for j in students if students.count(j) > 1})
    if twice:
        raise ConfigError(f"student layer {twice[0]} is claimed twice in {students}; list each student layer once")
    if len(set(pairs)) != len(pairs):
        raise ConfigError(f"a (teacher, layer) entry is listed twice in {list(pairs)}")
    if len(pairs) != len(students):
        raise ConfigError(f"{len(pairs)} teacher layers are paired one-to-one with student layers {students}; give as many of each "
                          "(profile.k or method.student_layers=[...])")
    # the one pairing rule (common/layers/pairing.py), with relative depths within each teacher
    depths = [pairing.relative_depth(layer, n_layers[t]) for t, layer in pairs]
    chosen = pairing.in_depth_order(depths, students, ties=[(layer, t) for t, layer in pairs])
    return [(t, layer, j) for (t, layer), j in sorted(zip(pairs, chosen), key=lambda entry: entry[1])]


def check_compatible(records: Sequence[Mapping[str, Any]]) -> None:
    """Teachers trained on other data or another class count cannot be distilled together: their
    features describe other images or other labels. Their S/I/E/Q must come from the same subsets
    A and B, or the pooled ranking compares numbers of other images. records: per teacher its name,
    `dataset` (name and fingerprint), `num_classes` and `subsets` (the quality key and subset
    sizes), as its stage-1 manifest records them."""
    first = records[0]
    for r in records[1:]:
        for key, what in (("dataset", "dataset"), ("num_classes", "class count"), ("subsets", "S/I/E/Q subsets A and B")):
            if r.get(key) != first.get(key):
                raise DataError(f"teachers {first['name']} and {r['name']} were trained on another {what} "
                                f"({first.get(key)} vs {r.get(key)}); distil together only teachers of one dataset and class count")


# ----------------------------------------------------------------------------- the manifest


@dataclass(frozen=True)
class MultiManifest:
    """Stage 1's multi-teacher hand-over, as written in profile.yaml."""

    dir: Path
    data: dict[str, Any]

    @property
    def names(self) -> list[str]:
        return [t["name"] for t in self.data["teachers"]]

    @property
    def n_layers(self) -> list[int]:
        return [int(t["n_layers"]) for t in self.data["teachers"]]

    def pairs(self, which: str, rule: str) -> list[Pair]:
        """The (teacher, layer) entries a method's layer word names: "baseline" (half of each
        teacher's list), "selected" (profile.criterion) or a criterion, under `rule`."""
        if which == "baseline":
            return [tuple(p) for p in self.data["baseline"]]  # type: ignore[misc]
        criterion = self.data["criterion"] if which == "selected" else which
        if criterion not in CRITERIA:
            raise ConfigError(f"teacher layers '{which}' with several teachers; use selected, baseline or one of {', '.join(CRITERIA)}")
        chosen = (self.data["selections"].get(rule) or {}).get(criterion)
        if chosen is None:
            raise DataError(f"{self.dir / MANIFEST}: no {rule} top-{self.data['k']} by {criterion} "
                            "(too few layers with a finite score, or k below the number of teachers)")
        return [tuple(p) for p in chosen]  # type: ignore[misc]


def manifest_dir(cfg: Config, data: Any) -> Path:
    """<artifacts>/<dataset>/<A>+<B>-<hash>: keyed by every teacher's id and the profile key."""
    from common.artifacts import layout as artifacts

    ids = [artifacts.teacher_id(config_of(cfg, t), data) for t in teacher_configs(cfg)]
    return Path(cfg.artifacts) / cfg.dataset.name / artifacts.dir_name(f"{joined_name(cfg)}-{short_hash({'teachers': ids, **artifacts.profile_key(cfg)})}")


def build_manifest(cfg: Config, teachers: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The content of profile.yaml from the teachers' own stage-1 manifests (`.data` each,
    with `num_classes` added): the pooled table, both rules' top-k by every criterion, the
    baseline halves. Pure."""
    tables = [t["layers"] for t in teachers]
    k = cfg.profile.k
    selections: dict[str, dict[str, Any]] = {}
    for rule, select in (("pooled", select_pooled), ("per_teacher", select_per_teacher)):
        selections[rule] = {}
        for criterion in CRITERIA:
            try:
                selections[rule][criterion] = [list(p) for p in select(tables, k, criterion)]
            except (ConfigError, DataError):
                selections[rule][criterion] = None
    baselines = [t["baseline_layers"] for t in teachers]
    try:
        baseline = [list(p) for p in baseline_pairs(baselines, k)]
    except ConfigError:
        baseline = None
    return {
        "teachers": [{"name": t["teacher"]["name"], "id": t["teacher"]["id"], "sha256": t["teacher"]["sha256"],
                      "n_layers": len(t["layers"]), "num_classes": t.get("num_classes"), "baseline_layers": list(t["baseline_layers"])}
                     for t in teachers],
        "dataset": teachers[0]["dataset"],
        "quality": teachers[0]["quality"],
        "k": k,
        "criterion": cfg.profile.criterion,
        "layers": [{"teacher": t, "name": teachers[t]["teacher"]["name"], **{key: row[key] for key in ("index", "module", "S", "I", "E", "Q", "sqrtIE")}}
                   for t, rows in enumerate(tables) for row in rows],
        "selections": selections,
        "baseline": baseline,
    }


def load_manifest(cfg: Config, data: Any) -> MultiManifest | None:
    mdir = manifest_dir(cfg, data)
    path = mdir / MANIFEST
    if not path.exists():
        return None
    try:
        return MultiManifest(mdir, yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, OSError) as exc:
        raise CacheError(f"{path} cannot be read ({type(exc).__name__}); delete it and rerun stage 1") from None


def run(cfg: Config, data: Any = None) -> MultiManifest:
    """Stage 1 for several teachers: each teacher's single profile (skipped when done), the
    compatibility check, then the multi-teacher manifest (rewritten only when it changes)."""
    import pandas as pd

    from common.checks import load_data_checked
    from common.files import atomic_write, atomic_write_text, file_lock
    from common.layers.tables import layer_infos_for
    from common.profile import runner

    teachers = teacher_configs(cfg)
    configs = [config_of(cfg, t) for t in teachers]
    data = load_data_checked(configs[0], data)
    for c in configs[1:]:
        load_data_checked(c, data)
    validate(cfg, [len(layer_infos_for(t, data)) for t in teachers])
    for c in configs:  # every teacher's own profile settings, before the first one trains
        runner.validate(c, len(layer_infos_for(c.teacher, data)))
    manifests = []
    for c in configs:
        tic = time.perf_counter()
        one = runner.manifest_for(c, data)
        log.info("profile: teacher %s ready (%.1fs)", c.teacher.name, time.perf_counter() - tic)
        manifests.append({**one.data, "num_classes": data.num_classes})
    check_compatible([{"name": m["teacher"]["name"], "dataset": {k: m["dataset"][k] for k in ("name", "fingerprint")},
                       "num_classes": m["num_classes"], "subsets": {k: v for k, v in m["quality"].items() if k != "dir"}}
                      for m in manifests])
    content = build_manifest(cfg, manifests)
    mdir = manifest_dir(cfg, data)
    with file_lock(mdir / ".lock"):
        text = yaml.safe_dump(content, sort_keys=False)
        path = mdir / MANIFEST
        if not path.exists() or path.read_text() != text:
            table = pd.DataFrame(content["layers"])
            atomic_write(mdir / "quality.csv", lambda tmp: table.to_csv(tmp, index=False))
            atomic_write_text(path, text)
    chosen = MultiManifest(mdir, content)
    log.info("profile: %d teachers, %s top-%d by %s: %s", len(teachers), cfg.teacher_rule, cfg.profile.k, cfg.profile.criterion,
             describe(chosen.names, chosen.pairs("selected", cfg.teacher_rule)) if (content["selections"][cfg.teacher_rule] or {}).get(cfg.profile.criterion) else "none")
    return chosen


def manifest_for(cfg: Config, data: Any) -> MultiManifest:
    """The multi-teacher manifest, running stage 1 first when it is missing."""
    found = load_manifest(cfg, data)
    return found if found is not None else run(cfg, data)


def describe(names: Sequence[str], pairs: Sequence[Sequence[int]]) -> str:
    """'resnet34:14 vgg19:12': each distilled layer with its teacher's name."""
    return " ".join(f"{names[p[0]]}:{p[1]}" for p in pairs)
