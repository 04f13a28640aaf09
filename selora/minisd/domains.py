"""The pretraining domains side by side: what a caption can state, and drawing captioned examples.

A caption belongs to one domain; its attributes are the domain's (``shapes.ATTRIBUTES``,
``views.ATTRIBUTES``) plus ``domain`` itself. Every head of the text encoder's pretraining and of the
judge is one of these attributes.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from selora.minisd import shapes, views

DOMAINS: dict[str, ModuleType] = {"shapes": shapes, "views": views}
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "domain": tuple(DOMAINS),
    **{k: v for d in DOMAINS.values() for k, v in d.ATTRIBUTES.items()},
}


def stated(text: str) -> dict[str, str]:
    """Every attribute ``text`` states, ``domain`` included; {} for the empty prompt."""
    for name, domain in DOMAINS.items():
        said = domain.stated(text)
        if said:
            return {"domain": name, **said}
    return {}


def labels(text: str) -> dict[str, int]:
    """Class index per attribute for what ``text`` states; ``len(classes)`` where it states nothing."""
    said = stated(text)
    return {k: classes.index(said[k]) if k in said else len(classes) for k, classes in ATTRIBUTES.items()}


def random_captions(n: int, rng: np.random.Generator, empty: float = 0.1) -> list[str]:
    """``n`` captions of random examples of either domain, a fraction ``empty`` of them empty."""
    out = []
    for _ in range(n):
        domain = DOMAINS[tuple(DOMAINS)[rng.integers(len(DOMAINS))]]
        out.append("" if rng.random() < empty else domain.caption(domain.draw_attributes(rng), rng))
    return out
