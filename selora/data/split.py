"""Deterministic grouped, stratified splits (patients or reports never cross a split)."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence


def _targets(n: int, fractions: Mapping[str, float]) -> dict[str, int]:
    """Largest-remainder rounding of ``n * fraction`` so the counts add up to ``n``."""
    raw = {k: n * f for k, f in fractions.items()}
    out = {k: int(v) for k, v in raw.items()}
    for k in sorted(raw, key=lambda k: out[k] - raw[k])[: n - sum(out.values())]:
        out[k] += 1
    return out


def grouped_split(
    groups: Sequence[Hashable],
    fractions: Mapping[str, float],
    seed: int,
    strata: Sequence[Hashable] | None = None,
) -> dict[str, list[int]]:
    """Assign item indices to splits; items sharing a group land in the same split.

    ``groups[i]`` is item i's group (patient, report), ``strata[i]`` its class (a group takes
    the class of its first item). Within each class the groups are shuffled with ``seed``,
    ordered largest first, and each goes to the split furthest below its target count
    ``fraction * n_items`` (rounded so the targets add up).
    Returns ``{split: sorted item indices}``.
    """
    if abs(sum(fractions.values()) - 1.0) > 1e-9:
        raise ValueError(f"split fractions {dict(fractions)} must add up to 1")
    strata = strata if strata is not None else [0] * len(groups)
    members: dict[Hashable, list[int]] = defaultdict(list)
    group_class: dict[Hashable, Hashable] = {}
    for i, (g, s) in enumerate(zip(groups, strata)):
        members[g].append(i)
        group_class.setdefault(g, s)
    rng = random.Random(seed)
    out: dict[str, list[int]] = {k: [] for k in fractions}
    for cls in sorted(set(group_class.values()), key=repr):
        cls_groups = sorted((g for g, c in group_class.items() if c == cls), key=repr)
        rng.shuffle(cls_groups)
        cls_groups.sort(key=lambda g: -len(members[g]))  # big groups first, singles fill up exactly
        target = _targets(sum(len(members[g]) for g in cls_groups), fractions)
        count = dict.fromkeys(fractions, 0)
        for g in cls_groups:
            split = max(fractions, key=lambda k: (target[k] - count[k], fractions[k]))
            out[split].extend(members[g])
            count[split] += len(members[g])
    return {k: sorted(v) for k, v in out.items()}


def carve(
    splits: Mapping[str, list[int]],
    source: str,
    name: str,
    share: float,
    groups: Sequence[Hashable],
    strata: Sequence[Hashable],
    seed: int,
) -> dict[str, list[int]]:
    """``splits`` with ``share`` of split ``source``'s items moved to a new split ``name`` by
    :func:`grouped_split` on those items (same groups and strata); every other split is unchanged."""
    items = splits[source]
    sub = grouped_split([groups[i] for i in items], {source: 1 - share, name: share}, seed, [strata[i] for i in items])
    return {**splits, source: [items[j] for j in sub[source]], name: [items[j] for j in sub[name]]}
