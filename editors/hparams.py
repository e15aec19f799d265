"""Hyper-parameters: one dataclass per editor, declared bounds checked in one place, presets per model.

:class:`HParams` is the dataclass every editor's hyper-parameters extend
(DESIGN.md Decision 5). Each field's valid values are declared once, in the
class's ``BOUNDS`` (:class:`Interval` for numbers, :class:`Options` for a choice
among names), and :meth:`HParams.validate` checks them all, with messages naming
the valid range; an editor adds only the checks that involve several fields.
``PRESETS`` maps a model key (``"embedded"``, a Hugging Face id of
:data:`KNOWN_MODELS`, or any exact spec) to the field values for that model;
:meth:`HParams.preset` picks one for a model by name, or by family and size.
"""
from __future__ import annotations

import dataclasses
import json
import operator
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Mapping, Sequence

from analysis.errors import InputError

if TYPE_CHECKING:
    from analysis.model import Workbench

# ================================================================ constraints


class Interval:
    """A number in an interval, as scikit-learn's ``Interval(Real, low, high, closed=...)``.

    ``kind`` is :class:`numbers.Real` (an ``int`` or ``float``) or
    :class:`numbers.Integral` (an ``int``); ``bool`` is neither. ``low`` or
    ``high`` may be None (unbounded); ``closed`` says which ends are included:
    ``"left"``, ``"right"``, ``"both"`` or ``"neither"``.
    """

    def __init__(self, kind: type, low: float | None, high: float | None, *, closed: str = "both"):
        if kind not in (Real, Integral):
            raise TypeError(f"Interval kind must be numbers.Real or numbers.Integral, got {kind!r}.")
        if closed not in ("left", "right", "both", "neither"):
            raise ValueError(f"closed must be 'left', 'right', 'both' or 'neither', got {closed!r}.")
        self.kind, self.low, self.high, self.closed = kind, low, high, closed

    def __repr__(self) -> str:
        return f"Interval({self.kind.__name__}, {self.low!r}, {self.high!r}, closed={self.closed!r})"

    def _has_type(self, value: Any) -> bool:
        types = (int,) if self.kind is Integral else (int, float)
        return not isinstance(value, bool) and isinstance(value, types)

    def contains(self, value: Any) -> bool:
        if not self._has_type(value):
            return False
        left, right = self.closed in ("left", "both"), self.closed in ("right", "both")
        if self.low is not None and not (value >= self.low if left else value > self.low):
            return False
        if self.high is not None and not (value <= self.high if right else value < self.high):
            return False
        return value == value  # NaN is in no interval

    def describe(self) -> str:
        """"a number >= 0", "a whole number >= 1", "a number in [0, 1)" ..."""
        what = "a whole number" if self.kind is Integral else "a number"
        show = (lambda x: f"{x}") if self.kind is Integral else (lambda x: f"{x:g}")
        left, right = self.closed in ("left", "both"), self.closed in ("right", "both")
        if self.low is not None and self.high is not None:
            return f"{what} in {'[' if left else '('}{show(self.low)}, {show(self.high)}{']' if right else ')'}"
        if self.low is not None:
            return f"{what} {'>=' if left else '>'} {show(self.low)}"
        if self.high is not None:
            return f"{what} {'<=' if right else '<'} {show(self.high)}"
        return what

    def check(self, name: str, value: Any) -> None:
        if not self.contains(value):
            raise InputError(f"{name} must be {self.describe()}, got {value!r}.")


class Options:
    """One of a fixed set of values (scikit-learn's ``StrOptions``); ``what`` names the choice in messages."""

    def __init__(self, what: str, options: Sequence[Any]):
        self.what, self.options = what, tuple(options)

    def __repr__(self) -> str:
        return f"Options({self.what!r}, {self.options!r})"

    def contains(self, value: Any) -> bool:
        return value in self.options

    def describe(self) -> str:
        return f"one of: {', '.join(map(str, self.options))}"

    def check(self, name: str, value: Any) -> None:
        if not self.contains(value):
            raise InputError(f"Unknown {self.what} {value!r}; use {self.describe()}.")


Constraint = Interval | Options


# ============================================================= plain data


def json_default(value: Any) -> Any:
    """``json.dumps``'s ``default`` for edit and hyper-parameter data: tensors, arrays, sets, paths, dataclasses."""
    if hasattr(value, "tolist"):  # torch tensors, numpy arrays and scalars
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def plain(value: Any) -> Any:
    """JSON-ready plain data (tuples become lists)."""
    return json.loads(json.dumps(value, default=json_default))


# ============================================================ models, presets


@dataclass(frozen=True)
class ModelSignature:
    """What identifies a model's shape for presets: family, layers, width."""

    family: str
    n_layers: int
    d_model: int


#: Models the papers' presets are for (Design Decision 5), with their shapes.
KNOWN_MODELS: dict[str, ModelSignature] = {
    "embedded": ModelSignature("gemma3_text", 18, 640),
    "meta-llama/Llama-3.1-8B": ModelSignature("llama", 32, 4096),
    "meta-llama/Meta-Llama-3-8B": ModelSignature("llama", 32, 4096),
    "Qwen/Qwen2-7B": ModelSignature("qwen2", 28, 3584),
    "Qwen/Qwen2.5-7B": ModelSignature("qwen2", 28, 3584),
    "bigscience/bloomz-7b1-mt": ModelSignature("bloom", 30, 4096),
    "EleutherAI/gpt-j-6b": ModelSignature("gptj", 28, 4096),
}
#: Other names of the known models (lower case, without the organisation).
MODEL_ALIASES: dict[str, str] = {
    "meta-llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama3.1-8b": "meta-llama/Llama-3.1-8B",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "gpt-j-6b": "EleutherAI/gpt-j-6b",
    "gemma-3-270m": "embedded",
}


def model_signature(wb: Workbench) -> ModelSignature:
    """The :class:`ModelSignature` of a Workbench."""
    return ModelSignature(wb.arch.family, int(wb.n_layers), int(wb.d_model))


def known_model_key(name: str | None) -> str | None:
    """The :data:`KNOWN_MODELS` key for a model name, id or local folder name; None if unknown."""
    if not name:
        return None
    name = str(name).strip()
    lowered = {key.lower(): key for key in KNOWN_MODELS}
    if name.lower() in lowered:
        return lowered[name.lower()]
    base = name.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1].lower()
    by_base = {key.rsplit("/", 1)[-1].lower(): key for key in KNOWN_MODELS}
    return by_base.get(base) or MODEL_ALIASES.get(base)


@dataclass
class HParams:
    """Hyper-parameters common to all editors; each editor extends this dataclass.

    ``layers`` are the layers an editor changes (negative numbers count from the
    end). ``PRESETS`` maps a model key (``"embedded"``, a Hugging Face id of
    :data:`KNOWN_MODELS`, or any exact spec) to the field values for that model;
    :meth:`preset` picks one. ``BOUNDS`` declares the valid values of fields
    (:class:`Interval`, :class:`Options`); :meth:`validate` checks them all in
    one place, as scikit-learn's parameter constraints. An editor's class looks like::

        @dataclass
        class LuLafnsHParams(HParams):
            beta: float = 0.1          # lu-lafns Eq. 5 threshold
            lambda1: float = 1.0       # lu-lafns Eq. 10
            steps: int = 25

            BOUNDS: ClassVar[dict[str, Constraint]] = {
                "beta": Interval(Real, 0, 1, closed="both"),
                "lambda1": Interval(Real, 0, None, closed="left"),
                "steps": Interval(Integral, 1, None, closed="left"),
            }
            PRESETS: ClassVar[dict[str, dict]] = {
                "meta-llama/Llama-3.1-8B": dict(layers=[11, 12, 13, 31], beta=0.1),
                "embedded": dict(layers=[3, 9, 10, 17], beta=0.0),
            }

            def validate(self, wb=None):
                super().validate(wb)   # layers and BOUNDS
                ...                    # checks that involve several fields

    ``BOUNDS`` merge over the class hierarchy (a subclass's entry for a field
    replaces its parent's). A subclass that defines ``__post_init__`` calls
    ``super().__post_init__()``.
    """

    layers: list[int] = field(default_factory=list)

    BOUNDS: ClassVar[dict[str, Constraint]] = {}
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    def __post_init__(self) -> None:
        if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, Iterable):
            raise InputError(f"layers must be a list of layer numbers, got {self.layers!r}.")
        try:
            self.layers = [operator.index(layer) for layer in self.layers]
        except TypeError:
            raise InputError(f"layers must be whole numbers, got {self.layers!r}.") from None

    @classmethod
    def bounds(cls) -> dict[str, Constraint]:
        """The declared ``BOUNDS`` of this class and its parents, a subclass's entry winning."""
        merged: dict[str, Constraint] = {}
        for klass in reversed(cls.__mro__):
            merged.update(vars(klass).get("BOUNDS", {}))
        return merged

    def validate(self, wb: Workbench | None = None) -> None:
        """Check the values (against ``wb``'s model where given); InputError naming the valid range.

        ``layers`` without repeats, then every field of :meth:`bounds` in field order,
        then (with ``wb``) the layers against the model.
        """
        if len(set(self.layers)) != len(self.layers):
            raise InputError(f"layers lists a layer twice: {self.layers}.")
        bounds = self.bounds()
        for f in dataclasses.fields(self):
            if f.name in bounds:
                bounds[f.name].check(f.name, getattr(self, f.name))
        if wb is not None:
            self.layer_indices(wb)

    def layer_indices(self, wb: Workbench) -> list[int]:
        """``layers`` as non-negative indices into ``wb``'s model; InputError for a layer out of range."""
        out = wb.check_layers(self.layers, from_end=True, sort=False) if self.layers else []
        if len(set(out)) != len(out):
            raise InputError(f"layers {self.layers} name one layer twice on this {wb.n_layers}-layer model.")
        return out

    # presets --------------------------------------------------------------
    @classmethod
    def preset_name(cls, name_or_wb: str | Workbench) -> str:
        """The key of ``PRESETS`` for a model name/spec or a Workbench.

        A name matches a key exactly, ignoring case, by its last path part
        ("Llama-3.1-8B", a local folder of that name) or through
        :data:`MODEL_ALIASES`. A Workbench is tried by its spec, name and
        ``config._name_or_path``, then by family and size (:data:`KNOWN_MODELS`:
        an instruct or fine-tuned variant of a known model gets its preset).
        """
        wb = None if isinstance(name_or_wb, str) else name_or_wb
        names = [name_or_wb] if wb is None else [
            getattr(wb, "spec", None), getattr(wb, "name", None),
            getattr(getattr(getattr(wb, "model", None), "config", None), "_name_or_path", None)]
        for name in names:
            key = cls._preset_key_for_name(name)
            if key is not None:
                return key
        signature = None
        if wb is not None:
            signature = model_signature(wb)
            for key in cls.PRESETS:
                if KNOWN_MODELS.get(known_model_key(key) or key) == signature:
                    return key
        what = repr(name_or_wb) if wb is None else (
            f"{getattr(wb, 'name', '?')!r} ({signature.family}, {signature.n_layers} layers, "
            f"d_model {signature.d_model})")
        if not cls.PRESETS:
            raise InputError(f"{cls.__name__} has no presets; set its fields yourself: "
                             f"{', '.join(f.name for f in dataclasses.fields(cls))}.")
        raise InputError(f"No {cls.__name__} preset for {what}. Presets: {', '.join(cls.PRESETS)}. "
                         f"Pick one by name or set the fields yourself ({cls.__name__}(layers=[...], ...)).")

    @classmethod
    def _preset_key_for_name(cls, name: Any) -> str | None:
        if not name:
            return None
        name = str(name).strip()
        if name in cls.PRESETS:
            return name
        lowered = {key.lower(): key for key in cls.PRESETS}
        if name.lower() in lowered:
            return lowered[name.lower()]
        known = known_model_key(name)
        for key in cls.PRESETS:
            if known is not None and known_model_key(key) == known:
                return key
        return None

    @classmethod
    def preset(cls, name_or_wb: str | Workbench) -> "HParams":
        """The preset for a model (see :meth:`preset_name`), as a new instance."""
        return cls.from_dict(cls.PRESETS[cls.preset_name(name_or_wb)])

    # plain data -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "HParams":
        if not isinstance(data, Mapping):
            raise InputError(f"{cls.__name__}: expected an object of field values, got {type(data).__name__}.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InputError(f"{cls.__name__} has no field(s) {', '.join(map(repr, unknown))}; "
                             f"its fields are {', '.join(sorted(names))}.")
        try:
            return cls(**{k: _copy_value(v) for k, v in data.items()})
        except TypeError as exc:
            raise InputError(f"{cls.__name__}: {exc}") from None


def _copy_value(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value

