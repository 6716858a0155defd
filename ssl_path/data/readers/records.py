"""Plain records: what every reader returns and all that probes and heads ever see of a labelled set."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple


class Box(NamedTuple):
    """An axis-aligned box in pixels: (x0, y0) top-left, (x1, y1) bottom-right, and its class name."""

    x0: float
    y0: float
    x1: float
    y1: float
    label: str

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def center(self) -> tuple[float, float]:
        return (self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2

    @property
    def is_degenerate(self) -> bool:
        """True when the box has no area (x1 <= x0 or y1 <= y0)."""
        return self.x1 <= self.x0 or self.y1 <= self.y0

    def clipped(self, width: float, height: float) -> Box:
        """The part of the box inside a ``width`` x ``height`` image (no area if none is)."""
        return Box(
            min(max(self.x0, 0.0), width),
            min(max(self.y0, 0.0), height),
            min(max(self.x1, 0.0), width),
            min(max(self.y1, 0.0), height),
            self.label,
        )


class Point(NamedTuple):
    """A labelled location in pixels, e.g. a mitotic figure's centre."""

    x: float
    y: float
    label: str


@dataclass(frozen=True)
class Record:
    """One labelled image: where it is, what it shows, and where it came from.

    ``label`` is a class name for image-level tasks; ``boxes``/``points``/``mask_path`` carry
    dense or instance targets. ``group`` (patient or slide) keeps splits leak-free and ``domain``
    (scanner, site, organ) drives domain-shift evaluations. ``meta`` holds small extra fields.
    """

    path: str
    label: str | None = None
    group: str | None = None
    domain: str | None = None
    mask_path: str | None = None
    boxes: tuple[Box, ...] = ()
    points: tuple[Point, ...] = ()
    split: str | None = None
    # Excluded from the hash (a dict is unhashable) but still compared.
    meta: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        # Accept Path objects and lists from callers; store the canonical immutable forms.
        object.__setattr__(self, "path", str(self.path))
        if self.mask_path is not None:
            object.__setattr__(self, "mask_path", str(self.mask_path))
        object.__setattr__(self, "boxes", tuple(Box(*b) for b in self.boxes))
        object.__setattr__(self, "points", tuple(Point(*p) for p in self.points))
        object.__setattr__(self, "meta", dict(self.meta))


def _as_set(value: str | Collection[str] | None) -> frozenset[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return frozenset({value})
    return frozenset(value)


@dataclass(frozen=True)
class LabelledSet:
    """Records plus their class names in a fixed order (index = class id), a name and a source.

    ``source`` is a SPEC string (``reader:path?options``) that reads the same set again;
    ``info`` holds what the reader noticed (e.g. dropped degenerate boxes). ``classes`` stays
    the same after :meth:`filter`, so class ids agree between the splits of one set.
    """

    records: Sequence[Record]  # stored as a tuple
    classes: Sequence[str]  # stored as a tuple
    name: str
    source: str
    info: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "records", tuple(self.records))
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "info", dict(self.info))
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"{self.name}: duplicate class names in {self.classes}")
        known = set(self.classes)
        for record in self.records:
            used = {b.label for b in record.boxes} | {p.label for p in record.points}
            if record.label is not None:
                used.add(record.label)
            unknown = used - known
            if unknown:
                raise ValueError(f"{self.name}: {record.path} uses classes {sorted(unknown)} not in {self.classes}")

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __getitem__(self, index: int) -> Record:
        return self.records[index]

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}

    def labels(self) -> list[str | None]:
        """The image-level label of every record, in record order."""
        return [r.label for r in self.records]

    def targets(self) -> list[int]:
        """Class ids of the image-level labels; -1 where a record has no label."""
        index = self.class_to_idx
        return [index[r.label] if r.label is not None else -1 for r in self.records]

    def class_counts(self) -> dict[str, int]:
        """Records per image-level class, every class listed in class order (zeros included)."""
        counts = Counter(r.label for r in self.records if r.label is not None)
        return {name: counts[name] for name in self.classes}

    def box_counts(self) -> dict[str, int]:
        """Boxes per class over all records, in class order."""
        counts = Counter(b.label for r in self.records for b in r.boxes)
        return {name: counts[name] for name in self.classes}

    def splits(self) -> list[str]:
        return sorted({r.split for r in self.records if r.split is not None})

    def groups(self) -> list[str]:
        return sorted({r.group for r in self.records if r.group is not None})

    def domains(self) -> list[str]:
        return sorted({r.domain for r in self.records if r.domain is not None})

    def filter(
        self,
        predicate: Callable[[Record], bool] | None = None,
        *,
        split: str | Collection[str] | None = None,
        label: str | Collection[str] | None = None,
        group: str | Collection[str] | None = None,
        domain: str | Collection[str] | None = None,
    ) -> LabelledSet:
        """The records that match every given criterion; each field takes one value or several."""
        given = {"split": _as_set(split), "label": _as_set(label), "group": _as_set(group), "domain": _as_set(domain)}
        wanted = {key: values for key, values in given.items() if values is not None}

        def keep(record: Record) -> bool:
            if any(getattr(record, key) not in values for key, values in wanted.items()):
                return False
            return predicate is None or predicate(record)

        return dataclasses.replace(self, records=tuple(r for r in self.records if keep(r)))

    def summary(self) -> str:
        """One line for logs: name, number of images and per-class counts (of boxes for detection sets)."""
        counts = self.class_counts() if any(r.label is not None for r in self.records) else self.box_counts()
        parts = ", ".join(f"{name} {n}" for name, n in counts.items())
        return f"{self.name}: {len(self)} images ({parts})"

    def select(self, indices: Iterable[int]) -> LabelledSet:
        """The records at ``indices`` (e.g. a stratified few-label subset), classes unchanged."""
        return dataclasses.replace(self, records=tuple(self.records[i] for i in indices))
