"""Pure selection functions of rejection sampling: which candidate is chosen, which is rejected.

Rules (Llama 3 rejection sampling, made explicit):
- chosen   = the highest-reward candidate that is not truncated (a truncated candidate never ends its turn,
             so it is never chosen); ties go to the lowest index;
- rejected = the lowest-reward other non-truncated candidate (mode "worst"), or a seeded random other
             non-truncated candidate (mode "random"), never one identical to the chosen (same `keys`,
             e.g. the same completion ids: such a pair teaches nothing);
- a prompt whose candidates are all truncated gives no chosen and no pair (`all_truncated`);
- a prompt with a single usable candidate gives a chosen but no pair (`no_rejected`);
- a pair whose reward gap is below `min_gap` is dropped (`gap`).

No I/O, no torch: everything here is unit-tested on plain lists.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

MODES = ("worst", "random")


@dataclass(frozen=True)
class Selection:
    chosen: int | None  # index of the chosen candidate, None if all are truncated
    rejected: int | None  # index of the rejected candidate, None if there is no pair
    dropped: str | None = None  # None (a pair) | "all_truncated" | "no_rejected" | "gap"


def prompt_rng(seed: int, prompt_id: str, salt: str = "") -> random.Random:
    """A Random seeded from (seed, prompt id): the same draw whatever the order, sharding or resume."""
    digest = hashlib.sha256(f"{seed}\0{prompt_id}\0{salt}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def prompt_seed(seed: int, prompt_id: str, salt: str = "sample") -> int:
    """A 31-bit integer seed for (seed, prompt id), for engines that take an int seed per request."""
    digest = hashlib.sha256(f"{seed}\0{prompt_id}\0{salt}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def usable(truncated: list[bool]) -> list[int]:
    return [i for i, t in enumerate(truncated) if not t]


def best_index(rewards: list[float], truncated: list[bool]) -> int | None:
    """Highest reward among non-truncated candidates (lowest index on ties); None if all are truncated."""
    idx = usable(truncated)
    return max(idx, key=lambda i: (rewards[i], -i)) if idx else None


def worst_index(rewards: list[float], truncated: list[bool], exclude: set[int] | None = None) -> int | None:
    """Lowest reward among non-truncated candidates not in `exclude` (highest index on ties)."""
    idx = [i for i in usable(truncated) if i not in (exclude or set())]
    return min(idx, key=lambda i: (rewards[i], -i)) if idx else None


def random_index(truncated: list[bool], rng: random.Random, exclude: set[int] | None = None) -> int | None:
    """A uniformly random non-truncated candidate not in `exclude`."""
    idx = [i for i in usable(truncated) if i not in (exclude or set())]
    return rng.choice(idx) if idx else None


def select(rewards: list[float], truncated: list[bool], mode: str = "worst", min_gap: float = 0.0,
           rng: random.Random | None = None, keys: list | None = None) -> Selection:
    """Chosen/rejected for one prompt's candidates. `rng` is needed for mode "random". Candidates whose
    `keys` entry equals the chosen's are never the rejected one."""
    if mode not in MODES:
        raise ValueError(f"rejected mode must be one of {MODES}, got {mode!r}")
    if len(rewards) != len(truncated):
        raise ValueError("rewards and truncated differ in length")
    chosen = best_index(rewards, truncated)
    if chosen is None:
        return Selection(None, None, "all_truncated")
    same = {i for i in range(len(rewards)) if i == chosen or (keys is not None and keys[i] == keys[chosen])}
    if mode == "worst":
        rejected = worst_index(rewards, truncated, exclude=same)
    else:
        if rng is None:
            raise ValueError("mode 'random' needs a seeded rng")
        rejected = random_index(truncated, rng, exclude=same)
    if rejected is None:
        return Selection(chosen, None, "no_rejected")
    if rewards[chosen] - rewards[rejected] < min_gap:
        return Selection(chosen, None, "gap")
    return Selection(chosen, rejected, None)


def select_all(groups: list[dict], mode: str = "worst", min_gap: float = 0.0, seed: int = 0) -> tuple[list[Selection], dict]:
    """Selections for many prompts. `groups`: dicts with "id", "rewards", "truncated" and optionally "keys".

    Returns (selections in the same order, counts {"pairs", "all_truncated", "no_rejected", "gap"})."""
    out, counts = [], {"pairs": 0, "all_truncated": 0, "no_rejected": 0, "gap": 0}
    for g in groups:
        rng = prompt_rng(seed, str(g["id"]), "rejected") if mode == "random" else None
        s = select(list(g["rewards"]), list(g["truncated"]), mode, min_gap, rng, g.get("keys"))
        counts["pairs" if s.dropped is None else s.dropped] += 1
        out.append(s)
    return out, counts
