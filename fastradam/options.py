"""Every option of a step, declared once: its name, default, check and meaning.

The API signatures, the torch drop-in and the docs read :data:`OPTIONS` (a test asserts
that their defaults are these), :func:`check_group` turns a mapping of them into a validated
:class:`GroupOptions`, and the scalar fold (:mod:`fastradam.scalars`) reads that. A new
option is one :class:`Option` here, one field of :class:`GroupOptions`, and the math where
it lives (the fold, each backend's element code, the oracle).
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from fastradam.flavours import Flavour, resolve_flavour
from fastradam.schedules import KerasWarmup

#: The largest step: beyond 2**53 a step is no longer an exact float64 in the scalars.
MAX_STEP = 2**53


def real(name: str, value: Any) -> float:
    """``value`` as a float; TypeError unless it is a real number (booleans are refused)."""
    if type(value) in (float, int):  # the common case, without the slower ABC check
        return float(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    return float(value)


def non_negative(name: str, value: Any) -> float:
    """``value`` as a float; it must be finite and >= 0."""
    number = real(name, value)
    if not (math.isfinite(number) and number >= 0.0):
        raise ValueError(f"{name} must be finite and >= 0, got {number!r}")
    return number


def check_flag(name: str, value: Any) -> bool:
    """``value`` as a bool; TypeError unless it is a bool (or NumPy bool)."""
    if value is True or value is False:
        return value
    if not isinstance(value, np.bool_):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def check_step(step: Any, name: str = "step") -> int:
    """Return ``step`` as an int; it must be an integer >= 1 (booleans are refused)."""
    if type(step) is not int and (isinstance(step, (bool, np.bool_)) or not isinstance(step, numbers.Integral)):
        raise TypeError(f"{name} must be an int >= 1 (the 1-based update number), got {type(step).__name__}")
    if not 1 <= step <= MAX_STEP:
        raise ValueError(f"{name} must be >= 1 and <= 2**53 (the 1-based update number), got {step}")
    return int(step)


def check_grad_scale(grad_scale: Any) -> float:
    """``grad_scale`` must be a finite real number > 0."""
    value = real("grad_scale", grad_scale)
    if not (math.isfinite(value) and value > 0.0):
        raise ValueError(f"grad_scale must be finite and > 0, got {value!r}")
    return value


def _betas(name: str, betas: Any) -> tuple[float, float]:
    if not isinstance(betas, Sequence) or isinstance(betas, str) or len(betas) != 2:
        raise TypeError(f"{name} must be a pair (beta1, beta2), got {betas!r}")
    pair = tuple(real(f"{name}[{i}]", b) for i, b in enumerate(betas))
    for i, beta in enumerate(pair):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{name}[{i}] must be in [0, 1), got {beta!r}")
    return pair


def _flavour(name: str, flavour: Any) -> Flavour:
    return resolve_flavour(flavour)


def _schedule(name: str, schedule: Any) -> KerasWarmup | None:
    if schedule is not None and not isinstance(schedule, KerasWarmup):
        raise TypeError(f"{name} must be None or a KerasWarmup, got {type(schedule).__name__}")
    return schedule


@dataclass(frozen=True)
class Option:
    """One option of a parameter group: ``check(qualified_name, value)`` returns the validated value."""

    name: str
    default: Any
    check: Callable[[str, Any], Any]
    doc: str


#: Every option a group (or ``fused_step``) takes besides the step, in signature order.
OPTIONS: tuple[Option, ...] = (
    Option("lr", 1e-3, non_negative, "learning rate, finite and >= 0"),
    Option("betas", (0.9, 0.999), _betas, "(beta1, beta2), each in [0, 1)"),
    Option("eps", 1e-8, non_negative, "added to sqrt(v) (sqrt(v_hat) in some flavours), finite and >= 0"),
    Option("eps_root", 0.0, non_negative,
           "added to v_hat = v / (1 - beta2^t) under the square root (optax's eps_root), finite and >= 0"),
    Option("weight_decay", 0.0, non_negative, "weight decay, finite and >= 0"),
    Option("decoupled_weight_decay", False, check_flag, "decay p directly (AdamW style) instead of L2"),
    Option("maximize", False, check_flag, "maximize the objective (negate the gradient)"),
    Option("flavour", "torch", _flavour, "the RAdam variant: a fastradam.flavours preset name or a Flavour"),
    Option("schedule", None, _schedule, "a KerasWarmup lr schedule evaluated on the host, or None"),
)
#: Each option's default, by name.
DEFAULTS: dict[str, Any] = {option.name: option.default for option in OPTIONS}


@dataclass(frozen=True)
class GroupOptions:
    """Validated options of one parameter group (everything but the step)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    eps_root: float
    weight_decay: float
    decoupled_weight_decay: bool
    maximize: bool
    flavour: Flavour
    schedule: KerasWarmup | None


#: Validated groups by their options' values and types (only options of plain types are kept).
_CHECKED: dict[tuple, GroupOptions] = {}
_CACHE_SIZE = 256
_PLAIN = (float, int, bool, str, type(None), Flavour, KerasWarmup)


def _cache_key(options: Mapping[str, Any], where: str) -> tuple | None:
    """``options`` as a key that tells ``1`` from ``1.0`` from ``True`` (also inside ``betas``), or
    None when a value is of another type (its check may depend on more than its value)."""
    items = []
    for name, value in options.items():
        kind = type(value)
        if kind is tuple:
            if not all(type(beta) is float for beta in value):
                return None
        elif kind not in _PLAIN:
            return None
        items.append((name, kind, value))
    return where, tuple(items)


def check_group(options: Mapping[str, Any], where: str = "") -> GroupOptions:
    """Validate one group's options (missing ones take :data:`DEFAULTS`).

    ``where`` prefixes the argument names in messages, e.g. ``"groups[1]."``. Options of plain
    types (numbers, bools, strings, a tuple of floats, flavours, schedules: all immutable) that
    were valid before are not checked again.
    """
    key = _cache_key(options, where) if type(options) is dict else None
    checked = None if key is None else _CHECKED.get(key)
    if checked is None:
        checked = _check_group(options, where)
        if key is not None:
            if len(_CHECKED) >= _CACHE_SIZE:
                _CHECKED.clear()
            _CHECKED[key] = checked
    return checked


def _check_group(options: Mapping[str, Any], where: str) -> GroupOptions:
    if not isinstance(options, Mapping):
        raise TypeError(f"{where.rstrip('.') or 'group'} must be a mapping of options, got {type(options).__name__}")
    for key in options:
        if key not in DEFAULTS:
            unknown = sorted(set(options) - set(DEFAULTS))[0]
            raise ValueError(f"{where}{unknown} is not an option; options are {sorted(DEFAULTS)}")
    values = {option.name: option.check(where + option.name, options.get(option.name, option.default))
              for option in OPTIONS}
    beta1, beta2 = values.pop("betas")
    return GroupOptions(beta1=beta1, beta2=beta2, **values)


class CheckedGroups:
    """Validated options of a sequence of groups that callers hand over anew at every step (as
    torch's param groups are): a group whose values are the very objects of last time is not
    checked again, so an unchanged step costs a few identity comparisons per option. A group may
    also be given as a :class:`GroupOptions` (validated already: taken as it is).

    ``keywords=True`` is one group given as keyword arguments: its messages name the options
    alone (``lr must be ...``), not ``groups[0].lr``."""

    def __init__(self, groups: Any, keywords: bool = False) -> None:
        self.keywords = keywords
        self.checked: list[GroupOptions] = []
        self.sources: list[Mapping[str, Any] | GroupOptions] = []
        self._plain: list[bool | None] = []
        if isinstance(groups, Mapping) or not isinstance(groups, Sequence) or len(groups) == 0:
            raise TypeError("groups must be a non-empty sequence of option mappings (dicts)")
        self.keep(groups, [group if type(group) is GroupOptions else check_group(group, self._where(i))
                           for i, group in enumerate(groups)])

    def _where(self, index: int) -> str:
        return "" if self.keywords else f"groups[{index}]."

    def check(self, groups: Sequence[Mapping[str, Any] | GroupOptions]) -> list[GroupOptions]:
        """The validated options of ``groups`` (as many as at construction), re-checking every group
        but those whose values are the very immutable objects of the kept ones; keeps nothing
        (:meth:`keep` does, once the caller's other checks passed too)."""
        if isinstance(groups, Mapping) or not isinstance(groups, Sequence) or len(groups) != len(self.checked):
            raise ValueError(f"groups must be a sequence of {len(self.checked)} option mappings, as bound")
        checked = []
        for i, (new, old, kept) in enumerate(zip(groups, self.sources, self.checked)):
            if type(new) is GroupOptions:
                checked.append(new)
            elif (type(new) is dict and new.keys() == old.keys() and all(new[k] is old[k] for k in new)
                  and self._is_plain(i)):  # (a list betas may change in place: not plain)
                checked.append(kept)
            else:
                checked.append(check_group(new, self._where(i)))
        return checked

    def _is_plain(self, index: int) -> bool:
        """Whether kept source ``index`` holds only immutable values of plain types (found on first use)."""
        plain = self._plain[index]
        if plain is None:
            source = self.sources[index]
            plain = self._plain[index] = type(source) is dict and _cache_key(source, "") is not None
        return plain

    def keep(self, groups: Sequence[Mapping[str, Any] | GroupOptions], checked: list[GroupOptions]) -> None:
        """Make ``groups`` (validated as ``checked``) the kept ones."""
        if (len(checked) == len(self.checked) and all(map(operator.is_, checked, self.checked))
                and all(map(operator.is_, groups, self.sources))):
            return  # the kept ones themselves (validated options given as they are)
        # a group whose check gave back the kept object is as plain as the kept source was
        before = dict(zip(map(id, self.checked), self._plain))
        self.checked = checked
        self.sources = [group if type(group) is GroupOptions else dict(group) for group in groups]
        self._plain = [before.get(id(group)) if type(source) is dict else False
                       for source, group in zip(self.sources, checked)]
