"""Value pools shipped as package data (real names, cities, universities, majors, companies).

Pools are plain text files in ``factlab/world/data``; a configurable size takes a
deterministic subset (the first k entries; first names alternate genders so any subset
stays balanced).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

from factlab.errors import FactlabError

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December")


def _lines(name: str) -> list[str]:
    text = resources.files("factlab.world").joinpath("data", name).read_text("utf-8")
    return [line for line in text.splitlines() if line.strip()]


@dataclass(frozen=True)
class NamePools:
    """Where full names come from: ``first[a] middle[b] last[c]`` for a name key
    ``(a * len(middle) + b) * len(last) + c``. A world keeps these so that people added
    later (cohorts) are drawn from the same names, also after the world is loaded."""

    first: tuple[str, ...]
    first_gender: tuple[str, ...]  # "m" / "f", aligned with ``first``
    middle: tuple[str, ...]
    last: tuple[str, ...]

    @property
    def capacity(self) -> int:
        return len(self.first) * len(self.middle) * len(self.last)

    def split_keys(self, keys):
        Mi, L = len(self.middle), len(self.last)
        return keys // (Mi * L), (keys // L) % Mi, keys % L

    def names(self, keys) -> list[str]:
        f, m, la = self.split_keys(keys)
        return [f"{self.first[a]} {self.middle[b]} {self.last[c]}"
                for a, b, c in zip(f.tolist(), m.tolist(), la.tolist())]


@dataclass(frozen=True)
class Pools:
    first: tuple[str, ...]
    first_gender: tuple[str, ...]  # "m" / "f", aligned with ``first``
    middle: tuple[str, ...]
    last: tuple[str, ...]
    cities: tuple[str, ...]
    universities: tuple[str, ...]
    majors: tuple[str, ...]
    companies: tuple[str, ...]
    company_city: tuple[str, ...]  # HQ city of each company, aligned with ``companies``
    years: tuple[int, int]  # inclusive

    @property
    def names(self) -> NamePools:
        return NamePools(self.first, self.first_gender, self.middle, self.last)

    @property
    def n_dates(self) -> int:
        return (self.years[1] - self.years[0] + 1) * 12 * 28

    def date_strings(self) -> list[str]:
        """Every birth date, indexed by code = ((year - y0) * 12 + month) * 28 + day - 1."""
        y0, y1 = self.years
        return [f"{m} {d}, {y}" for y in range(y0, y1 + 1) for m in MONTHS for d in range(1, 29)]


@lru_cache(maxsize=1)
def _full() -> dict[str, list]:
    first = [line.split("\t") for line in _lines("first_names.tsv")]
    comp = [line.split("\t") for line in _lines("companies.tsv")]
    males = [n for n, g in first if g == "m"]
    females = [n for n, g in first if g == "f"]
    # alternate genders so that any prefix of the pool is balanced
    alt, gen = [], []
    for i in range(max(len(males), len(females))):
        for pool, g in ((males, "m"), (females, "f")):
            if i < len(pool):
                alt.append(pool[i])
                gen.append(g)
    return {
        "first": alt, "first_gender": gen,
        "middle": _lines("middle_names.txt"), "last": _lines("last_names.txt"),
        "cities": _lines("cities.txt"), "universities": _lines("universities.txt"),
        "majors": _lines("majors.txt"),
        "companies": [c for c, _ in comp], "company_city": [city for _, city in comp],
    }


def shipped_name_pools() -> NamePools:
    """Every shipped first, middle and last name: names for entities outside any world
    (new names to store facts about in a pretrained model)."""
    f = _full()
    return NamePools(tuple(f["first"]), tuple(f["first_gender"]), tuple(f["middle"]),
                     tuple(f["last"]))


def shipped_pool(key: str) -> tuple:
    """One whole shipped pool (``cities``, ``universities``, ``majors``, ``companies``, ...)."""
    full = _full()
    if key not in full:
        raise FactlabError(f"no shipped pool {key!r}: {', '.join(full)}")
    return tuple(full[key])


def available() -> dict[str, int]:
    """Size of every shipped pool."""
    full = _full()
    return {k: len(full[k]) for k in ("first", "middle", "last", "cities", "universities",
                                      "majors", "companies")}


def load_pools(sizes) -> Pools:
    """Pools cut to ``sizes`` (a :class:`~factlab.world.config.PoolSizes`)."""
    full = _full()
    have = available()
    cut = {}
    for key in have:
        k = getattr(sizes, key)
        if not 1 <= k <= have[key]:
            raise FactlabError(f"pools.{key}={k}: must be between 1 and {have[key]} "
                               f"(the shipped pool has {have[key]})")
        cut[key] = tuple(full[key][:k])
    y0, y1 = sizes.years
    if not (1 <= y0 <= y1 <= 9999):
        raise FactlabError(f"pools.years={list(sizes.years)}: need first <= last, 1..9999")
    return Pools(
        first=cut["first"], first_gender=tuple(full["first_gender"][: sizes.first]),
        middle=cut["middle"], last=cut["last"], cities=cut["cities"],
        universities=cut["universities"], majors=cut["majors"],
        companies=cut["companies"], company_city=tuple(full["company_city"][: sizes.companies]),
        years=(y0, y1),
    )
