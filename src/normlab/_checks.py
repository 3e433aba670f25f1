"""Input checks shared by the NumPy and PyTorch tiers.

Each check works on shapes and dtypes only, so one message serves both tiers. Every
message says what was expected and what came, so a wrong input never becomes a wrong
number.
"""
from __future__ import annotations

import math
import operator
from typing import Sequence


def shape_str(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def check_floating(x, op: str, kind: str = "") -> None:
    """TypeError unless ``x`` holds floating-point numbers; with ``kind="tensor"`` (the torch
    tiers) it must be a ``torch.Tensor``, with ``kind="array"`` (the NumPy reference) a NumPy array."""
    if kind == "array":
        import numpy as np

        if not isinstance(x, np.ndarray):
            hint = " (a torch tensor: pass t.detach().cpu().numpy())" if hasattr(x, "detach") else ""
            raise TypeError(f"{op} (the NumPy reference) expects a NumPy array, got {type(x).__name__}{hint}")
    elif kind == "tensor":
        import torch

        if not isinstance(x, torch.Tensor):
            hint = " (a NumPy array: wrap it with torch.from_numpy)" if type(x).__module__ == "numpy" else ""
            raise TypeError(f"{op} expects a torch.Tensor input, got {type(x).__name__}{hint}")
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        raise TypeError(f"{op} expects a floating-point tensor or array, got {type(x).__name__}")
    is_float = getattr(dtype, "is_floating_point", None)
    if is_float is None:  # NumPy
        import numpy as np

        is_float = np.issubdtype(dtype, np.floating)
    if not is_float:
        raise TypeError(
            f"{op} expects a floating-point input (float16, bfloat16, float32 or float64), got dtype {dtype}"
        )


def check_rank(shape, ranks: Sequence[int], op: str, layout: str) -> None:
    """ValueError unless ``len(shape)`` is one of ``ranks``; ``layout`` names the expected axes."""
    if len(shape) not in ranks:
        want = " or ".join(f"{r}-D" for r in ranks)
        raise ValueError(f"{op} expects a {want} input {layout}, got a {len(shape)}-D input of shape {shape_str(shape)}")


def check_channels(shape, num_features: int, op: str, axis: int = 1, arg: str = "num_features") -> None:
    if shape[axis] != num_features:
        raise ValueError(
            f"{op} was built for {num_features} channels ({arg}={num_features}) but the input has "
            f"{shape[axis]} along dim {axis}: input shape {shape_str(shape)}"
        )


def _when(running_stats: bool) -> str:
    """When batch statistics are used: in training, or always for a layer without running ones."""
    return "in training" if running_stats else "without running statistics (batch statistics in evaluation too)"


def check_enough_values(shape, reduce_axes: Sequence[int], op: str, what: str = "per channel", *,
                        allow_empty: bool = False, running_stats: bool = True) -> None:
    """Training statistics need more than one value per statistic (else the variance is 0/undefined).

    ``allow_empty``: an input with no values at all passes (torch's batch norm returns an empty
    output for it). ``running_stats=False``: the layer has no running statistics, so it uses
    batch statistics in evaluation too, and the message says that instead of "use eval mode"."""
    count = 1
    for a in reduce_axes:
        count *= shape[a]
    if count == 0 and allow_empty:
        return
    if count <= 1:
        hint = "use eval mode or a larger batch" if running_stats else "use a larger batch"
        raise ValueError(
            f"{op} {_when(running_stats)} needs more than 1 value {what} to compute its statistics, got input of shape "
            f"{shape_str(shape)} ({count} value {what}); {hint}"
        )


def as_normalized_shape(normalized_shape, op: str, allow_empty: bool = False) -> tuple:
    """``normalized_shape`` as a tuple of ints: an int (any integral type, e.g. np.int64) or a
    non-empty sequence of them (``allow_empty``: empty too), none negative."""
    import numbers

    items = (normalized_shape,) if isinstance(normalized_shape, numbers.Integral) else normalized_shape
    try:
        items = tuple(items)
    except TypeError:
        items = None
    if (items is None or (not items and not allow_empty) or
            any(isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 0 for s in items)):
        raise ValueError(f"{op}: normalized_shape must be a size or a non-empty sequence of sizes (ints >= 0) of "
                         f"the trailing dims to normalize over, got {normalized_shape!r}")
    return tuple(int(s) for s in items)


def check_normalized_shape(shape, normalized_shape: Sequence[int], op: str) -> tuple:
    ns = tuple(int(s) for s in normalized_shape)
    k = len(ns)
    if k == 0 or len(shape) < k or tuple(shape[len(shape) - k:]) != ns:
        raise ValueError(
            f"{op} normalizes over the trailing dims normalized_shape={shape_str(ns)}, but the input's shape "
            f"{shape_str(shape)} does not end with them"
        )
    return ns


def _real(value) -> float:
    """``float(value)`` for a real number (Python, NumPy, a 0-d tensor); TypeError for a string,
    which ``float`` would parse and the arithmetic would then refuse far from here."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"a string is not a number: {value!r}")
    return float(value)


def check_eps(eps, op: str, role: str = "added to the variance") -> None:
    """eps >= 0 (a negative or NaN eps turns a small variance into NaN outputs; torch accepts it
    silently, normlab's layers refuse it at construction). ``role`` says what eps does there."""
    try:
        ok = _real(eps) >= 0  # NumPy and 0-d tensor scalars are numbers too
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{op}: eps must be a number >= 0 ({role}), got eps={eps!r}")


def check_training_eps(eps, op: str) -> None:
    """Batch statistics need eps > 0: a constant channel would divide 0 by 0 (torch's rule)."""
    if not eps > 0:
        raise ValueError(f"{op}: eps must be positive in training (it keeps a constant channel from dividing 0 "
                         f"by 0), got eps={eps}")


def check_momentum(momentum, op: str) -> None:
    """``None`` (a cumulative average) or a number in [0, 1]: the weight of the new batch's
    statistics in the running estimate. Outside that range (or NaN) the running statistics
    extrapolate or turn NaN; torch accepts it silently, normlab refuses it."""
    if momentum is None:
        return
    try:
        ok = not isinstance(momentum, bool) and 0.0 <= _real(momentum) <= 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{op}: momentum must be None or a number in [0, 1] (the weight of the new batch "
                         f"statistics in the running estimate), got momentum={momentum!r}")


def check_running_args(running_mean, running_var, momentum, training: bool, op: str) -> None:
    """Running statistics come as a pair (both or neither), and a training step that updates
    them needs a number for ``momentum`` (the layers turn ``None`` into 1/num_batches_tracked)."""
    if (running_mean is None) != (running_var is None):
        given = "running_mean" if running_var is None else "running_var"
        raise ValueError(f"{op}: pass both running_mean and running_var or neither, got only {given}")
    if training and running_mean is not None and (momentum is None or isinstance(momentum, bool)):
        raise TypeError(f"{op}: momentum must be a number when training updates the running statistics, got "
                        f"{momentum!r} (the layers turn momentum=None into the factor 1/num_batches_tracked)")


def check_per_channel(num_channels: int, op: str, any_shape: bool = False, **params) -> None:
    """Each named per-channel tensor or array (weight, bias, running stats) holds one value per
    channel: a vector of ``num_channels`` (or a 0-D one when there is one channel), which is
    what torch's kernels take (a (1, C, 1) weight fails in them, some only in backward).
    ``any_shape``: any shape with ``num_channels`` elements (the NumPy reference reshapes it)."""
    for name, p in params.items():
        if p is None:
            continue
        if any_shape and not hasattr(p, "shape"):  # a list (the NumPy reference takes any array-like)
            import numpy as np

            p = np.asarray(p)
        shape = tuple(int(s) for s in p.shape)
        ok = math.prod(shape) == num_channels and (any_shape or len(shape) == 1 or (not shape and num_channels == 1))
        if not ok:
            want = f"{num_channels} elements" if any_shape else f"shape ({num_channels},)"
            raise ValueError(f"{op}: {name} must have {want} (one value per channel), got shape {shape}")


def check_param_shape(expected: Sequence[int], op: str, **params) -> None:
    """Each named elementwise parameter has shape ``normalized_shape``."""
    for name, p in params.items():
        if p is not None and tuple(p.shape) != tuple(expected):
            raise ValueError(f"{op}: {name} must have shape normalized_shape={shape_str(expected)}, "
                             f"got {shape_str(p.shape)}")


def check_mix_logits(op: str, **logits) -> None:
    """Switchable norm's mixing logits: 3 each (IN, LN, BN)."""
    for name, p in logits.items():
        if tuple(p.shape) != (3,):
            raise ValueError(f"{op}: {name} must hold 3 logits (IN, LN, BN), got shape {tuple(int(s) for s in p.shape)}")


def check_renorm_limits(rmax, dmax, op: str, warmup_steps=None) -> None:
    """Batch renorm's clips: rmax >= 1, dmax >= 0 and (when given) warmup_steps >= 0; NaN refused
    (written so that a NaN fails every comparison)."""
    try:
        ok = _real(rmax) >= 1 and _real(dmax) >= 0 and (warmup_steps is None or _real(warmup_steps) >= 0)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        need, got = "rmax >= 1, dmax >= 0", f"rmax={rmax!r}, dmax={dmax!r}"
        if warmup_steps is not None:
            need, got = need + ", warmup_steps >= 0", got + f", warmup_steps={warmup_steps!r}"
        raise ValueError(f"{op}: need {need}, got {got}")


def check_dim(dim: int, ndim: int, op: str) -> int:
    """``dim`` as a non-negative axis of an ``ndim``-D weight (negative counts from the end);
    IndexError when it is out of range, TypeError when it is not an integer, as torch raises."""
    ndim = int(ndim)
    if not isinstance(dim, bool):  # (a bool is refused below, as out of range)
        try:
            dim = operator.index(dim)  # an int, a NumPy integer, a 0-d integer tensor
        except TypeError:  # a float would be truncated to another axis: torch refuses it too
            raise TypeError(f"{op}: dim must be an int, got {dim!r}") from None
    if ndim == 0:  # torch: "Dimension specified as 0 but tensor has no dimensions"
        raise IndexError(f"{op}: dim={dim!r} needs a weight with at least 1 dimension, got a 0-D weight")
    if isinstance(dim, bool) or not -ndim <= dim < ndim:
        raise IndexError(f"{op}: dim must be in [-{ndim}, {ndim - 1}] for a {ndim}-D weight, got {dim!r}")
    return int(dim) % ndim


def check_positive_int(value, op: str, name: str) -> None:
    """A count (channels, groups, a window size): an int >= 1 (anything with ``__index__``: a
    NumPy integer, a 0-d integer tensor), not a bool or a float."""
    import operator

    try:
        ok = not isinstance(value, bool) and operator.index(value) >= 1
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"{op}: {name} must be a positive int, got {value!r}")


def check_groups(num_channels: int, num_groups: int, op: str) -> None:
    check_positive_int(num_groups, op, "num_groups")
    if num_channels % num_groups != 0:
        raise ValueError(
            f"{op}: num_groups={num_groups} must be positive and divide the number of channels "
            f"{num_channels} (it leaves {num_channels % num_groups if num_groups > 0 else 'n/a'} over)"
        )


def check_group_size(shape, num_groups: int, op: str) -> None:
    """Each group of an (N, C, *spatial) input must hold more than one value (C / G times the
    spatial size): a single value normalizes to 0 whatever it is, so the output would be the
    bias alone. torch refuses this only when the whole input is one value per group (N = 1)
    and otherwise returns the bias; normlab refuses it always, as instance norm does."""
    per_group = (shape[1] // num_groups) * math.prod(shape[2:])
    if math.prod(shape) > 0 and per_group <= 1:
        raise ValueError(f"{op}: each of the {num_groups} groups holds a single value ({shape[1] // num_groups} "
                         f"channel(s) x {math.prod(shape[2:])} position(s)) in input of shape {shape_str(shape)}; "
                         "a single value normalizes to 0, leaving only the bias: use fewer groups or keep the "
                         "spatial dims")


def check_mask(x_shape, mask, op: str) -> None:
    """A padding mask for an (N, C, L) input: shape (N, L), boolean, True where the position is valid."""
    dtype = mask.dtype
    is_bool = str(dtype) in ("bool", "torch.bool")
    if not is_bool:
        raise TypeError(f"{op} expects a boolean mask (True = valid position, False = padding), got dtype {dtype}")
    want = (x_shape[0], x_shape[2])
    if tuple(mask.shape) != want:
        raise ValueError(
            f"{op} expects a mask of shape (N, L) = {shape_str(want)} for an input of shape {shape_str(x_shape)}, "
            f"got a mask of shape {shape_str(mask.shape)}"
        )


def all_padding_rows(valid_per_row) -> list:
    """Indices of the sequences that have no valid position (a list of ints)."""
    return [i for i, v in enumerate(valid_per_row) if v == 0]


def check_enough_valid(count: int, shape, op: str, running_stats: bool = True) -> None:
    """Masked batch statistics need more than one valid position per channel (``count`` of them)."""
    if count <= 1:
        raise ValueError(f"{op} {_when(running_stats)} needs more than 1 valid position per channel, got {count} "
                         f"(input shape {shape_str(shape)})")


def check_no_empty_rows(valid_per_row, op: str) -> None:
    empty = all_padding_rows(valid_per_row)
    if empty and len(empty) == len(valid_per_row):
        raise ValueError(f"{op}: the whole batch is padding (the mask is all False); there is nothing to normalize")
    if empty:
        shown = empty[:8]
        more = f" and {len(empty) - 8} more" if len(empty) > 8 else ""
        raise ValueError(
            f"{op}: sequence(s) {shown}{more} of the batch are all padding (mask all False); every sequence "
            f"needs at least one valid position (True = valid)"
        )
