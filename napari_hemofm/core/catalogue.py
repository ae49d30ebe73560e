"""The class catalogue: presets of cell classes, and what kind of cell a label names.

Labels are kept as the user or the crop folder wrote them (DESIGN.md); the catalogue
resolves a label, by its name, its code or a synonym, to a :class:`CellClass` of the
project's preset, which says how the differential counts it (``kind``), which colour
and number key it has, and how to display it:

- ``wbc``: a white cell, counted in the differential (percents sum to 100);
- ``non_wbc``: NRBC, platelets, smudge cells, artefacts: reported per 100 white cells;
- ``not_classed``: left out of every count (:data:`~.report.NOT_CLASSED` and the
  bone-marrow set's "not identifiable").

The presets live in the package's ``data/classes.json``: "Peripheral blood" and
"Bone marrow" (the 21 classes of Matek et al. 2021, with their three-letter codes).
A project stores its preset in ``uns["hemofm"]["class_preset"]`` and its own (custom)
classes' kinds and colours in ``uns["hemofm"]["custom_classes"]``; a label that is in
neither is a custom white-cell class.

Matching ignores case, ``_`` / ``-`` / repeated spaces and a plural ``s``, so
``NEUTROPHIL``, ``neutrophils``, ``SNE`` and ``Segmented_Neutrophil`` all resolve.

References
----------
Matek C, Krappe S, Münzenmayer C, Haferlach T, Marr C. Highly accurate differentiation
of bone marrow cell morphologies using deep neural networks on a large image data set.
Blood 138(20):1917-1927 (2021). https://doi.org/10.1182/blood.2020010568
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from napari_hemofm.core.cells import CellTable

Kind = Literal["wbc", "non_wbc", "not_classed"]
KINDS: tuple[str, ...] = ("wbc", "non_wbc", "not_classed")
"""The kinds a class can have, in report order."""

PRESET_KEY = "class_preset"
"""``uns["hemofm"]`` key of the project's preset name."""
CUSTOM_KEY = "custom_classes"
"""``uns["hemofm"]`` key of the project's own classes: JSON ``{name: {"kind", "color"}}``."""
DEFAULT_PRESET = "Peripheral blood"
"""The preset of a project that names none."""
NOT_CLASSED = "Not classed"
"""The label of cells kept out of the counts (also :data:`~.report.NOT_CLASSED`)."""
CUSTOM_COLOR = "#808080"


@dataclass(frozen=True)
class CellClass:
    """One class of a preset (or a project's custom class).

    Attributes
    ----------
    name : str
        Canonical name (what the class bar shows for a new project).
    kind : {"wbc", "non_wbc", "not_classed"}
    color : str
        ``#rrggbb``.
    code : str
        Short code (the bone-marrow set's three letters), ``""`` when none.
    synonyms : tuple of str
        Other spellings that resolve to this class.
    key : int or None
        Number key of the class in its preset (1-9), ``None`` beyond the ninth or
        outside the class bar; 0 for :data:`NOT_CLASSED`.
    preset : str
        The preset it comes from (``""`` for custom classes).
    """

    name: str
    kind: Kind
    color: str
    code: str = ""
    synonyms: tuple[str, ...] = ()
    key: int | None = None
    preset: str = ""


def normalise(label: str) -> str:
    """Matching key of a label: case-folded, ``_``/``-`` as spaces, spaces collapsed."""
    text = re.sub(r"[_\-\s]+", " ", str(label)).strip().casefold()
    return re.sub(r"\s*/\s*", " / ", text)


class Preset:
    """A named class list (hotkey order) and the names it recognises.

    Parameters
    ----------
    name : str
    classes : sequence of CellClass
        The class bar, in hotkey order.
    also : sequence of CellClass
        Classes recognised (kind, colour) but not put on the class bar.
    description : str
    """

    def __init__(
        self,
        name: str,
        classes: Sequence[CellClass],
        also: Sequence[CellClass] = (),
        description: str = "",
    ) -> None:
        self.name = name
        self.classes = list(classes)
        self.also = list(also)
        self.description = description
        self._index: dict[str, CellClass] = {}
        for cls in [*self.classes, *self.also]:
            for word in (cls.name, cls.code, *cls.synonyms):
                if not word:
                    continue
                key = normalise(word)
                other = self._index.get(key)
                if other is not None and other.name != cls.name:
                    raise ValueError(
                        f"preset {name!r}: {word!r} names both {other.name!r} and {cls.name!r}"
                    )
                self._index[key] = cls

    @property
    def names(self) -> list[str]:
        """Class names in hotkey order."""
        return [c.name for c in self.classes]

    def resolve(self, label: str) -> CellClass | None:
        """The class ``label`` names (name, code or synonym), or ``None``."""
        key = normalise(label)
        if key == normalise(NOT_CLASSED):
            return CellClass(NOT_CLASSED, "not_classed", CUSTOM_COLOR, key=0, preset=self.name)
        found = self._index.get(key)
        if found is None and len(key) > 3 and key.endswith("s"):
            found = self._index.get(key[:-1])  # a plural not listed
        return found


def _cell_class(entry: dict[str, Any], preset: str, key: int | None) -> CellClass:
    kind = entry["kind"]
    if kind not in KINDS:
        raise ValueError(f"class {entry['name']!r}: kind must be one of {KINDS}; got {kind!r}")
    return CellClass(
        name=str(entry["name"]),
        kind=kind,
        color=str(entry["color"]),
        code=str(entry.get("code", "")),
        synonyms=tuple(str(s) for s in entry.get("synonyms", ())),
        key=key,
        preset=preset,
    )


@lru_cache(maxsize=1)
def presets() -> dict[str, Preset]:
    """The presets shipped with the package (``napari_hemofm/data/classes.json``).

    Returns
    -------
    dict of str to Preset
        ``"Peripheral blood"`` and ``"Bone marrow"``, in that order.
    """
    text = resources.files("napari_hemofm").joinpath("data", "classes.json").read_text("utf-8")
    data = json.loads(text)
    out = {}
    for name, spec in data["presets"].items():
        classes = [
            _cell_class(e, name, i + 1 if i < 9 else None) for i, e in enumerate(spec["classes"])
        ]
        also = [_cell_class(e, name, None) for e in spec.get("also", [])]
        out[name] = Preset(name, classes, also, spec.get("description", ""))
    return out


def preset_names() -> list[str]:
    """Names of the shipped presets."""
    return list(presets())


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (case-insensitive).

    Raises
    ------
    ValueError
        If there is no such preset; the message lists the known ones.
    """
    for key, preset in presets().items():
        if normalise(key) == normalise(name):
            return preset
    raise ValueError(f"no class preset {name!r}; presets are {preset_names()}")


def project_preset(table: CellTable) -> Preset:
    """The preset stored with a project (:data:`DEFAULT_PRESET` when none, or unknown)."""
    name = table.meta.get(PRESET_KEY)
    try:
        return get_preset(str(name)) if name else get_preset(DEFAULT_PRESET)
    except ValueError:
        return get_preset(DEFAULT_PRESET)


def custom_classes(table: CellTable) -> dict[str, dict[str, str]]:
    """The project's own classes: ``{name: {"kind": ..., "color": ...}}``."""
    raw = table.meta.get(CUSTOM_KEY)
    return dict(json.loads(raw)) if raw else {}


def set_custom_class(
    table: CellTable, name: str, kind: Kind = "wbc", color: str | None = None
) -> None:
    """Record the kind (and colour) of a class that no preset knows (or override one).

    Parameters
    ----------
    table : CellTable
    name : str
        The label, as written.
    kind : {"wbc", "non_wbc", "not_classed"}
    color : str, optional
        ``#rrggbb``; default: the map's colour of its place in the class list.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}; got {kind!r}")
    entries = custom_classes(table)
    entries[str(name)] = {"kind": kind, **({"color": color} if color else {})}
    table.update_meta(**{CUSTOM_KEY: json.dumps(entries)})


def resolve(table: CellTable, label: str) -> CellClass:
    """What ``label`` is in this project: a custom class, a preset class, else custom ``wbc``.

    A project's custom entry wins (the user said so); then the project's preset; then
    the other presets (a bone-marrow code in a blood project); a label no one knows is
    a white-cell class of its own (users add classes such as "hairy cell").

    Returns
    -------
    CellClass
        ``name`` is the display name (the canonical name of a known class, else the
        label as written).
    """
    label = str(label)
    custom = custom_classes(table).get(label)
    if custom is not None:
        return CellClass(
            label,
            custom.get("kind", "wbc"),  # type: ignore[arg-type]
            custom.get("color", CUSTOM_COLOR),
        )
    own = project_preset(table)
    found = own.resolve(label)
    if found is None:
        for preset in presets().values():
            if preset is not own and (found := preset.resolve(label)) is not None:
                break
    return found if found is not None else CellClass(label, "wbc", CUSTOM_COLOR)


def kinds_of(table: CellTable, labels: Sequence[Any]) -> list[str]:
    """The kind of each label (``wbc``, ``non_wbc``, ``not_classed``), one lookup per name."""
    cache: dict[str, str] = {}
    out = []
    for label in labels:
        text = str(label)
        if text not in cache:
            cache[text] = resolve(table, text).kind
        out.append(cache[text])
    return out


def preset_classes(
    preset: str | Preset, existing: Sequence[str] = (), in_use: Sequence[str] | None = None
) -> list[str]:
    """A class list that starts from a preset and keeps the labels in use.

    A label in use that names a preset class (by name, code or synonym: ``SNE`` for
    "segmented neutrophil") takes that class's place and key, spelled as written; the
    other labels in use follow the preset's classes. Classes of the old list that no
    cell uses are dropped (switching presets replaces them).

    Parameters
    ----------
    preset : str or Preset
    existing : sequence of str
        The table's current class list (its order is kept for the labels in use).
    in_use : sequence of str, optional
        Labels and predictions the table's cells carry (default: every ``existing``
        class counts as in use).

    Returns
    -------
    list of str
        Hotkey order; :data:`NOT_CLASSED` is not in it.
    """
    if isinstance(preset, str):
        preset = get_preset(preset)
    used = {str(c) for c in (existing if in_use is None else in_use)}
    existing = [str(c) for c in existing if str(c) != NOT_CLASSED]
    existing += [c for c in sorted(used) if c not in existing and c != NOT_CLASSED]
    kept = [c for c in existing if c in used]
    taken: dict[str, str] = {}
    for label in kept:
        cls = preset.resolve(label)
        if cls is not None and cls.name in preset.names and cls.name not in taken:
            taken[cls.name] = label
    out = [taken.get(name, name) for name in preset.names]
    out += [c for c in kept if c not in out]
    return out


def apply_preset(table: CellTable, name: str) -> list[str]:
    """Start (or switch) a project's class bar from a preset.

    Stores ``uns["hemofm"]["class_preset"]`` and sets the class list to
    :func:`preset_classes`: the preset's classes, where a label in use names one it
    keeps its spelling, then the other labels in use; unused classes are dropped. This is
    what a new project gets from ``hemofm embed --preset`` or the Review panel's preset
    menu, so the class bar is full from the first cell.

    Parameters
    ----------
    table : CellTable
    name : str
        A preset name (see :func:`preset_names`), case-insensitive.

    Returns
    -------
    list of str
        The new class list.

    Raises
    ------
    ValueError
        If there is no such preset.
    """
    preset = get_preset(name)
    obs = table.obs
    in_use = set(obs["label"].dropna().astype(str)) | set(obs["prediction"].dropna().astype(str))
    classes = preset_classes(preset, table.classes, sorted(in_use))
    if NOT_CLASSED in in_use:
        classes.append(NOT_CLASSED)
    table.update_meta(**{PRESET_KEY: preset.name})
    table.set_classes(classes)
    return classes
