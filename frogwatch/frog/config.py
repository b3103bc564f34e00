"""``FrogConfig``: the settings that ``prepare``, ``save_delta`` and ``load_delta`` share.

One validated, serialisable dataclass (PEFT's ``LoraConfig`` plays the same role): ``prepare``
builds it from its keyword arguments, the prepared model keeps it, ``save_delta`` writes
``config.to_dict()`` into the file's metadata and ``load_delta`` rebuilds it with
:meth:`FrogConfig.from_dict`, which fills keys missing in files from older versions with their
defaults and ignores (with a warning) keys it does not know.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Union

import torch

from .._validation import check_bool, check_choice, check_float, check_int, fail_type, fail_value

__all__ = ["DELTA_DTYPES", "FrogConfig", "SCHEDULES", "Schedule"]

Schedule = Union[str, Callable[[int], float]]
SCHEDULES = ("constant", "linear", "cosine")
#: ``delta_dtype`` choices. ``"auto"``: float32 master deltas on a bfloat16 / float16 model, the
#: weight's dtype otherwise; ``"weight"``: always the weight's dtype.
DELTA_DTYPES = ("auto", "weight", "float32", "float64", "bfloat16", "float16")
_LOW_PRECISION = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class FrogConfig:
    """Settings of a FROG fine-tune.

    Parameters
    ----------
    init_scale : float, default 0
        ``delta(0) = init_scale * S_sel * N(0, 1)``; 0 starts exactly at the pretrained model.
    noise_scale : float, default 0
        Train-mode noise ``noise_scale * f(step) * noise_std * S * N(0, 1)`` on the frozen
        entries; 0 disables noise (and stores nothing for it).
    noise_std : float, default 1
        Standard deviation of the noise draw (> 0).
    noise_schedule : {"constant", "linear", "cosine"} or callable, default "constant"
        ``f(step)``: 1; ``1 - step/noise_steps`` floored at 0; half-cosine from 1 to 0 over
        ``noise_steps``; or ``callable(step) -> factor >= 0``. A callable cannot be written to a
        file: :meth:`to_dict` stores its ``__name__`` and ``load_delta`` asks for it again.
    noise_steps : int, optional
        Length of the linear / cosine decay in steps (required by those schedules).
    noise_rank : int, optional
        How the noise amplitude S of each frozen layer is kept. ``None`` (default): S coded in
        one byte per entry (log scale over each row's range, entries below 1e-4 of the row's
        maximum raised to it; relative error <= 1.8 %). An int r: the rank-r factors ``|U_r| diag(sigma_r)`` and ``|V_r|``
        only (``r * (out + in)`` numbers per layer); the noise then uses the rank-r partial
        sum of S, which is below S entry by entry.
    seed : int, default 0
        Seeds the init (per layer) and the noise (per step and layer).
    train_bias : bool, default False
        Leave the targeted layers' biases trainable.
    delta_dtype : str, default "auto"
        dtype of the trainable deltas (and so of their gradients and optimizer state), one of
        :data:`DELTA_DTYPES`. ``"auto"`` keeps float32 master deltas on bfloat16 / float16 models:
        an update smaller than the weight's rounding step then accumulates in the delta instead of
        being lost; the forward pass adds the delta in the compute dtype.
    """

    init_scale: float = 0.0
    noise_scale: float = 0.0
    noise_std: float = 1.0
    noise_schedule: Schedule = "constant"
    noise_steps: int | None = None
    noise_rank: int | None = None
    seed: int = 0
    train_bias: bool = False
    delta_dtype: str = "auto"

    def __post_init__(self) -> None:
        f = "FrogConfig"
        put = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen dataclass)
        put("init_scale", check_float(self.init_scale, "init_scale", f, low=0.0))
        put("noise_scale", check_float(self.noise_scale, "noise_scale", f, low=0.0))
        put("noise_std", check_float(self.noise_std, "noise_std", f, low=0.0, low_open=True))
        put("noise_steps", check_int(self.noise_steps, "noise_steps", f, low=1, allow_none=True))
        put("noise_rank", check_int(self.noise_rank, "noise_rank", f, low=1, allow_none=True))
        put("seed", check_int(self.seed, "seed", f))
        put("train_bias", check_bool(self.train_bias, "train_bias", f))
        put("delta_dtype", check_choice(self.delta_dtype, "delta_dtype", f, DELTA_DTYPES))
        sched = self.noise_schedule
        if not callable(sched):
            if not isinstance(sched, str):
                raise fail_type(f, "noise_schedule", f"one of {SCHEDULES} or a callable", sched)
            if sched not in SCHEDULES:
                raise fail_value(f, "noise_schedule", f"one of {SCHEDULES} or a callable", sched)
            if sched != "constant" and self.noise_steps is None:
                raise fail_value(
                    f, "noise_steps", f"a positive int when noise_schedule={sched!r} (the decay "
                    "length in steps)", None,
                )

    # ---- behaviour -----------------------------------------------------------------------------

    def schedule_factor(self, step: int) -> float:
        """``f(step)`` of the noise schedule (1 at step 0)."""
        sched = self.noise_schedule
        if callable(sched):
            v = float(sched(step))
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"noise_schedule({step}) returned {v}; it must be a finite value >= 0")
            return v
        if sched == "constant":
            return 1.0
        frac = min(step, self.noise_steps) / self.noise_steps
        if sched == "linear":
            return 1.0 - frac
        return 0.5 * (1.0 + math.cos(math.pi * frac))  # cosine

    def resolve_delta_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        """The deltas' dtype for a weight of ``weight_dtype`` (see ``delta_dtype``)."""
        if self.delta_dtype == "auto":
            return torch.float32 if weight_dtype in _LOW_PRECISION else weight_dtype
        if self.delta_dtype == "weight":
            return weight_dtype
        return getattr(torch, self.delta_dtype)

    # ---- serialisation -------------------------------------------------------------------------

    def to_dict(self, *, strict: bool = False) -> dict[str, Any]:
        """JSON-ready dict. A callable schedule is stored as ``"callable:<its __name__>"``.

        With ``strict=True`` a callable schedule raises ``ValueError`` instead.
        """
        d = dataclasses.asdict(self)
        if callable(self.noise_schedule):
            if strict:
                raise ValueError("FrogConfig.to_dict: a callable noise_schedule cannot be serialised")
            d["noise_schedule"] = f"callable:{getattr(self.noise_schedule, '__name__', 'schedule')}"
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, noise_schedule: Schedule | None = None) -> "FrogConfig":
        """Rebuild from :meth:`to_dict` output, from this or another frogwatch version.

        Missing keys take their defaults; unknown keys are dropped with a warning.
        ``noise_schedule`` replaces the stored schedule (required when it was a callable).

        Raises
        ------
        ValueError
            The stored schedule was a callable and ``noise_schedule`` is not given, or a value
            is invalid.
        """
        if not isinstance(d, Mapping):
            raise fail_type("FrogConfig.from_dict", "d", "a mapping", d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            warnings.warn(f"FrogConfig: ignoring settings unknown to this frogwatch version: "
                          f"{unknown}", stacklevel=2)
        kw = {k: v for k, v in d.items() if k in known}
        if noise_schedule is not None:
            kw["noise_schedule"] = noise_schedule
        elif isinstance(kw.get("noise_schedule"), str) and kw["noise_schedule"].startswith("callable"):
            raise ValueError(
                f"the delta was trained with a callable noise_schedule "
                f"({kw['noise_schedule']!r}); pass noise_schedule= to load it"
            )
        return cls(**kw)

    def replace(self, **changes: Any) -> "FrogConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
