"""Ordered cell classes and the static (non-developing) subset, as configured.

Seed 000: PMC and SC are somatic ("static") cells; the other six form the developmental
sequence that the Adjacent-k metrics walk along. Keeping both in config makes another tissue
a config change.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_CLASSES = ("PMC", "SC", "Spg Ad", "Spg", "Pl-Z", "P", "rsptd", "esptd")
DEFAULT_STATIC = ("PMC", "SC")


@dataclass(frozen=True)
class Taxonomy:
    classes: tuple[str, ...] = DEFAULT_CLASSES
    static: tuple[str, ...] = DEFAULT_STATIC
    _index: dict = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        classes = tuple(self.classes)
        static = tuple(self.static)
        if len(set(classes)) != len(classes):
            raise ValueError(f"classes: duplicate names in {list(classes)}")
        unknown = [s for s in static if s not in classes]
        if unknown:
            raise ValueError(f"static_classes: {unknown} are not in classes {list(classes)}")
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "static", static)
        object.__setattr__(self, "_index", {c: i for i, c in enumerate(classes)})

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def dynamic(self) -> tuple[str, ...]:
        """Developmental sequence: the configured classes minus the static ones, in order."""
        return tuple(c for c in self.classes if c not in self.static)

    def index(self, name: str, *, where: str = "label") -> int:
        try:
            return self._index[name]
        except KeyError:
            raise ValueError(
                f"{where}: unknown class {name!r}; expected one of {list(self.classes)}"
            ) from None

    def stage(self) -> list[int]:
        """Per class index: position in the developmental sequence, or -1 for static classes."""
        dyn = self.dynamic
        return [dyn.index(c) if c in dyn else -1 for c in self.classes]
