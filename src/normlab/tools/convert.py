"""Swap every normalization layer of a model for another kind, by name: ``convert(model, "group:32")``.

What it does, for each normalization layer found (torch's or normlab's):

1. reads what the layer normalizes: its kind, channel count C and number of spatial dims
   (from its class, from ``dim=``, or from the input it receives on ``example_input``). A
   ``LayerNorm(C)``/``RMSNorm(C)`` stores no layout: without ``example_input`` convert
   *assumes* its input is (N, C), so that C are channels, and says so in the
   :class:`Change`'s ``notes``. Over the last dim of an (N, L, C) input that assumption is
   wrong (a channel-wise norm of dim 1 would normalize something else): pass
   ``example_input=`` and convert checks it, refusing such a layer;
2. builds the replacement with :func:`normlab.nn.make_norm` for that C and dim, carrying over
   ``eps``, whether it has affine parameters and a bias (``bias=False`` stays so where the
   new layer takes a ``bias`` argument; where it does not, its β is zero and frozen, and the
   Change notes it), between batch-statistics layers ``momentum`` and
   ``track_running_stats``, and to a layer of the same kind all its own settings (``momentum``
   too, ``None`` included: it means a cumulative average in batch norm but "never update" in
   instance norm, so it is carried only where it keeps its meaning), on the layer's device and
   dtype, in its mode;
3. carries over what means the same on both sides (γ/β as the source's own ``Parameter``
   objects where shape, dtype and device match, so an optimizer or EMA built before the
   conversion still updates them, as after ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``;
   otherwise, and for running statistics, copies): per-channel γ/β between the channel-wise norms
   (batch, sync batch, batch renorm, switchable, masked batch, instance, group, and layer/RMS
   norm over a (N, C) input), element-wise γ/β between layer and RMS norm of the same shape,
   and running statistics (with ``num_batches_tracked``) between the batch-statistics layers
   (batch, sync batch, batch renorm, switchable, masked batch) and between two layers of the
   same kind (instance -> instance); a new layer with running statistics where the old one kept
   none (group -> batch) starts them at mean 0, var 1, and the Change says so;
4. only when every replacement could be built, puts them in place.

So a failure leaves the model as it was. Kinds, as :func:`make_norm` names them: ``batch``,
``sync_batch``, ``batch_renorm``, ``switchable``, ``masked_batch``, ``instance``, ``group``,
``layer``, ``rms``, ``lrn``.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

import normlab.nn as nlnn
from normlab.nn.factory import make_norm, norm_specs

# kinds whose running statistics are batch statistics (same meaning, copied between them)
BATCH_STATS = ("batch", "sync_batch", "batch_renorm", "switchable", "masked_batch")
# kinds with per-channel weight/bias on a channel-first (N, C, *) input
CHANNEL_WISE = BATCH_STATS + ("instance", "group")
TRAILING = ("layer", "rms")  # torch/normlab LayerNorm and RMSNorm: normalize the trailing normalized_shape


@functools.lru_cache(maxsize=None)
def _classes() -> List[Tuple[tuple, str]]:
    """(classes, kind), most specific first (SyncBatchNorm subclasses batch norm in both libraries)."""
    from normlab.nn.batch_norm import _BatchNorm as NLBatchNorm
    from normlab.nn.batch_renorm import _BatchRenorm
    from normlab.nn.instance_norm import _InstanceNorm as NLInstanceNorm
    from normlab.nn.switchable_norm import _SwitchableNorm
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.instancenorm import _InstanceNorm

    rms = tuple(c for c in (getattr(nn, "RMSNorm", None), nlnn.RMSNorm) if c is not None)
    return [
        ((nn.SyncBatchNorm, nlnn.SyncBatchNorm), "sync_batch"),
        ((_BatchRenorm,), "batch_renorm"),
        ((_SwitchableNorm,), "switchable"),
        ((nlnn.MaskedBatchNorm1d,), "masked_batch"),
        ((_BatchNorm, NLBatchNorm), "batch"),
        ((_InstanceNorm, NLInstanceNorm), "instance"),
        ((nn.GroupNorm, nlnn.GroupNorm), "group"),
        ((nn.LayerNorm, nlnn.LayerNorm), "layer"),
        (rms, "rms"),
        ((nn.LocalResponseNorm, nlnn.LocalResponseNorm), "lrn"),
    ]


def norm_kind(module: nn.Module) -> Optional[str]:
    """The kind of a normalization layer (``"batch"``, ``"group"``, ...), or ``None`` if it is none.

    Examples::

        >>> norm_kind(torch.nn.BatchNorm2d(8)), norm_kind(torch.nn.Linear(2, 2))
        ('batch', None)
    """
    for classes, kind in _classes():
        if isinstance(module, classes):
            return kind
    return None


@dataclass(frozen=True)
class Change:
    """One replaced layer: where, what it was, what it became, and which tensors carried over.

    ``source``/``target`` read ``Class(settings)``, with ``torch.nn.``/``normlab.nn.`` in front
    when both classes have the same name (torch's BatchNorm2d -> normlab's).

    ``not_copied`` lists ``"tensor: why"`` for each parameter or buffer of the old layer that
    has no counterpart in the new one. ``notes`` lists what else the new layer does not take
    from the old one as it is, or what convert assumed without checking (``"bias: ..."``,
    ``"layout: ..."``).
    """

    name: str
    source: str
    target: str
    copied: Tuple[str, ...]
    not_copied: Tuple[str, ...] = ()
    notes: Tuple[str, ...] = ()

    def __str__(self) -> str:
        s = f"{self.name or '<root>'}: {self.source} -> {self.target}; copied: {', '.join(self.copied) or 'nothing'}"
        s += f"; not copied: {'; '.join(self.not_copied)}" if self.not_copied else ""
        return s + (f"; note: {'; '.join(self.notes)}" if self.notes else "")


@dataclass
class _Seen:
    """What a layer normalizes: C and the spatial dims of its (N, C, *) input, when known; for a layer or
    RMS norm, whether its trailing dims are (C, *spatial) of such an input (else it has no channel-first twin)."""

    kind: str
    channels: Optional[int]
    dim: Optional[int]
    channel_first: bool  # False: a layer/RMS norm on trailing dims that are not (C, *spatial) of an (N, C, *) input
    why_no_channels: str = ""
    assumed: bool = False  # a layer/RMS norm whose input was not seen: (N, C, *) is an assumption


def _class_dim(module: nn.Module) -> Optional[int]:
    name = type(module).__name__
    for suffix, dim in (("1d", 1), ("2d", 2), ("3d", 3)):
        if name.endswith(suffix):
            return dim
    return getattr(module, "spatial_dims", None)  # normlab SyncBatchNorm made by convert remembers it


def _normalized_shape(module) -> tuple:
    ns = module.normalized_shape
    return (int(ns),) if isinstance(ns, int) else tuple(int(s) for s in ns)


def _seen(module: nn.Module, kind: str, shape: Optional[torch.Size], dim: Optional[int]) -> _Seen:
    """What ``module`` normalizes, from its class, an explicit ``dim``, or an input ``shape`` it received."""
    if kind in TRAILING:
        ns = _normalized_shape(module)
        if shape is not None and len(shape) != len(ns) + 1:
            return _Seen(kind, None, None, False, f"it normalizes the trailing dims {tuple(ns)} of an input of shape "
                         f"{tuple(shape)}, not (C, *spatial) of an (N, C, *spatial) input, so a norm over channels "
                         f"at dim 1 would normalize something else")
        if len(ns) == 1:  # without an input to look at: assumed (N, C) (or (N, C, *spatial) with dim=)
            return _Seen(kind, ns[0], 0 if dim is None else dim, True, assumed=shape is None)
        if shape is None and dim is None:
            return _Seen(kind, None, None, False, f"its normalized_shape {tuple(ns)} is not a channel count; pass "
                         f"example_input= to show that its input is (N, C, *spatial)")
        return _Seen(kind, ns[0], len(ns) - 1, True, assumed=shape is None)
    if kind == "lrn" and shape is None:
        return _Seen(kind, None, dim, True, "LocalResponseNorm works for any channel count and does not store one; "
                     "pass example_input= so convert can read C from its input")
    channels = getattr(module, "num_features", None) or getattr(module, "num_channels", None)
    if shape is not None:
        return _Seen(kind, int(shape[1]), len(shape) - 2 if dim is None else dim, True)
    class_dim = _class_dim(module) if dim is None else dim
    # a batch-statistics "1d" layer (BatchNorm1d ...) takes (N, C) as well as (N, C, L): 1 spatial dim is assumed
    return _Seen(kind, channels, class_dim, True, assumed=dim is None and class_dim == 1 and kind in BATCH_STATS
                 and kind != "masked_batch")


def _layouts_problem(module: nn.Module, kind: str, target: nn.Module, inputs: list) -> str:
    """Why ``target`` (built from the first of ``inputs``, the shapes ``module`` was called on)
    cannot stand in for ``module`` on all of them, or ''. A LayerNorm/RMSNorm seen both as a
    channel norm ((N, C)) and over the trailing dims of a longer input means two things; a target
    that takes one rank (BatchNorm2d ...) or one channel count cannot take the others."""
    if len(inputs) < 2:
        return ""
    if kind in TRAILING:
        ns = _normalized_shape(module)
        if len({len(s) == len(ns) + 1 for s in inputs}) > 1:
            return "it normalizes the channels of some and trailing dims of others"
        if norm_kind(target) in TRAILING:
            return ""  # to another trailing-dims norm: any leading dims
    ranks = getattr(target, "_ranks", ())
    if ranks and any(len(s) not in ranks for s in inputs):
        return f"the {type(target).__name__} it would build takes {' or '.join(f'{r}-D' for r in ranks)} inputs only"
    channels = getattr(target, "num_features", None) or getattr(target, "num_channels", None)
    if channels is not None and any(len(s) > 1 and s[1] != channels for s in inputs):
        return f"the {type(target).__name__} it would build takes {channels} channels only"
    return ""


def _tensors_like(module: nn.Module, fallback: nn.Module) -> dict:
    for m in (module, fallback):
        for t in list(m.parameters()) + list(m.buffers()):
            if t.is_floating_point():
                return {"device": t.device, "dtype": t.dtype}
    return {}


def _init_args(cls) -> set:
    try:
        return set(inspect.signature(cls.__init__).parameters)
    except (TypeError, ValueError):
        return set()


def _carried(source: nn.Module, kind: str, target_cls, target_kind: Optional[str]) -> dict:
    """Constructor arguments that keep their meaning from ``source`` to a ``target_cls``."""
    accepts = _init_args(target_cls)
    out = {}
    eps = getattr(source, "eps", None)
    if isinstance(eps, float) and "eps" in accepts:
        out["eps"] = eps
    has_affine = (getattr(source, "affine", None) if hasattr(source, "affine")
                  else getattr(source, "elementwise_affine", None))
    if has_affine is not None:
        for name in ("affine", "elementwise_affine"):
            if name in accepts:
                out[name] = bool(has_affine)
    if kind in BATCH_STATS and target_kind in BATCH_STATS:
        for name in ("momentum", "track_running_stats"):
            if name in accepts and hasattr(source, name):
                out[name] = getattr(source, name)
    if getattr(source, "weight", None) is not None and getattr(source, "bias", 0) is None and "bias" in accepts:
        out["bias"] = False  # a γ without β (LayerNorm, BatchNorm, GroupNorm with bias=False) stays so
    if kind == target_kind:  # the same kind (torch's -> normlab's, or new settings): keep its own settings too
        for name in accepts - _SHAPE_ARGS - set(out):
            if not hasattr(source, name):
                continue
            value = getattr(source, name)
            # None is a setting too (an instance norm's momentum=None: its running statistics never move)
            if value is None or isinstance(value, (bool, int, float)):
                out[name] = value
        if "process_group" in accepts and getattr(source, "process_group", None) is not None:
            out["process_group"] = source.process_group  # a subgroup SyncBatchNorm stays in its subgroup
    return out


# given by the spec or the channel count, never carried as keyword arguments
_SHAPE_ARGS = {"self", "num_features", "num_channels", "num_groups", "normalized_shape", "size", "device", "dtype",
               "process_group", "bias"}


def _build(to: str, seen: _Seen, source: nn.Module, kind: str, kwargs: dict) -> nn.Module:
    """The replacement layer (not yet on the source's device)."""
    spec_name, _, arg = to.strip().lower().partition(":")
    if not arg and spec_name == kind == "group":
        to = f"group:{source.num_groups}"  # "group" alone keeps a GroupNorm's groups (not the default 32)
    if not arg and spec_name == kind == "lrn":
        to = f"lrn:{source.size}"
    if kind in TRAILING and spec_name in TRAILING and not arg:
        # layer <-> RMS norm: the same trailing normalized_shape, whatever the input's layout
        cls = nlnn.LayerNorm if spec_name == "layer" else nlnn.RMSNorm
        return cls(_normalized_shape(source), **{**_carried(source, kind, cls, spec_name), **kwargs})
    if seen.channels is None and spec_name == "lrn" and seen.channel_first:
        seen = _Seen(seen.kind, 1, seen.dim, True)  # local response norm works for any channel count
    if not seen.channel_first or seen.channels is None:
        raise ValueError(f"it has no {to!r} equivalent: {seen.why_no_channels}")
    dims = [seen.dim] if seen.dim is not None else [0, 1, 2, 3]
    built = {}
    for d in dims:
        try:
            probe = make_norm(to, seen.channels, d, **kwargs)
        except ValueError as e:
            if seen.dim is not None:
                hint = " (pass dim=0 if its input is (N, C))" if seen.dim == 1 and spec_name == "rms" else ""
                raise ValueError(f"{e}{hint}") from None
            continue
        built[d] = probe
    if not built:
        raise ValueError(f"norm spec {to!r} cannot be built for {seen.channels} channels at any dim")
    if seen.dim is None and len(built) < len(dims) and any(norm_kind(m) in TRAILING for m in built.values()):
        # a target that normalizes trailing dims and exists for some numbers of spatial dims only (rms: 0)
        # would be a guess: an RMSNorm(C) on (N, C, H, W) normalizes W, silently when W == C. (masked_batch and
        # lrn, built for the dims they take, refuse every input of another rank, loudly: they are built.)
        raise ValueError(f"the number of spatial dims of its input is unknown and {to!r} exists only for dim in "
                         f"{sorted(built)}; pass dim= (e.g. dim={min(built)}) or example_input= so convert can see "
                         f"the input")
    reprs = {(type(m), m.extra_repr()) for m in built.values()}
    if len(reprs) > 1:
        raise ValueError(f"the number of spatial dims of its input is unknown and {to!r} depends on it "
                         f"({', '.join(sorted({type(m).__name__ for m in built.values()}))}); pass dim= (e.g. dim=2 "
                         f"for (N, C, H, W)) or example_input= so convert can see the input")
    d, probe = next(iter(built.items()))
    target_kind = norm_kind(probe)
    carried = {k: v for k, v in _carried(source, kind, type(probe), target_kind).items() if k not in kwargs}
    target = make_norm(to, seen.channels, d, **carried, **kwargs) if carried else probe
    if isinstance(target, nlnn.SyncBatchNorm) and seen.dim is not None:
        target.spatial_dims = seen.dim
    return target


def _per_channel(m: nn.Module, kind: Optional[str], seen_channel_first: bool, c: int) -> bool:
    if kind in CHANNEL_WISE:
        return True
    if kind in TRAILING and seen_channel_first:
        return _normalized_shape(m) == (c,)
    return False


def _copy(source: nn.Module, kind: str, seen: _Seen, target: nn.Module) -> Tuple[tuple, tuple, tuple]:
    """Copy what means the same; returns (copied names, 'name: why' for the rest, notes on the target)."""
    target_kind = norm_kind(target)
    copied, dropped, notes = [], [], []
    c = seen.channels
    src_pc = _per_channel(source, kind, seen.channel_first, c) if c else False
    tgt_pc = _per_channel(target, target_kind, True, c) if c else False
    same_elementwise = (kind in TRAILING and target_kind in TRAILING
                        and _normalized_shape(source) == _normalized_shape(target))
    with torch.no_grad():
        for name in ("weight", "bias"):
            p = getattr(source, name, None)
            if p is None:
                continue
            q = getattr(target, name, None)
            if q is None:
                dropped.append(f"{name}: {type(target).__name__} has none")
            elif (src_pc and tgt_pc) or same_elementwise:
                if isinstance(p, nn.Parameter) and (p.shape, p.dtype, p.device) == (q.shape, q.dtype, q.device):
                    setattr(target, name, p)  # the same Parameter: an optimizer built before still trains it
                else:
                    q.copy_(p)
                    q.requires_grad_(p.requires_grad)
                copied.append(name)
            else:
                dropped.append(f"{name}: {tuple(p.shape)} element-wise in {type(source).__name__} vs "
                               f"{tuple(q.shape)} in {type(target).__name__}, no common meaning")
        q = getattr(target, "bias", None)
        if (getattr(source, "weight", None) is not None and hasattr(source, "bias") and source.bias is None
                and isinstance(q, torch.Tensor) and "bias" not in _init_args(type(target))):
            # γ without β, and a target class that has no bias=False (_carried passes it where it can; where the
            # class takes it and still has a bias, the caller asked for one with bias=True)
            q.zero_()
            q.requires_grad_(False)
            notes.append(f"bias: {type(source).__name__} had none and {type(target).__name__} cannot be built "
                         f"without one; it is 0 and frozen (requires_grad=False), so the layer computes as before")
        src_stats = getattr(source, "running_mean", None) is not None
        tgt_stats = getattr(target, "running_mean", None) is not None
        if src_stats:
            if tgt_stats and (kind == target_kind or (kind in BATCH_STATS and target_kind in BATCH_STATS)):
                for name in ("running_mean", "running_var", "num_batches_tracked"):
                    a, b = getattr(source, name, None), getattr(target, name, None)
                    if a is not None and b is not None and a.shape == b.shape:
                        b.copy_(a)
                        copied.append(name)
            elif not tgt_stats:
                dropped.append(f"running statistics: {type(target).__name__} keeps none")
            else:
                dropped.append(f"running statistics: {kind} and {target_kind} average different statistics")
        elif tgt_stats:
            # from any layer without them (an untracked batch norm, group, layer, instance norm): the new layer's
            # evaluation uses statistics nothing has measured yet
            how = "batch statistics" if kind in BATCH_STATS else "each input's own statistics"
            precise = ", or run normlab.tools.precise_bn," if target_kind in BATCH_STATS else ""
            dropped.append(f"running statistics: {type(source).__name__} kept none and normalized with {how} in "
                           f"evaluation too; {type(target).__name__} evaluates with its own, which start at mean 0, "
                           f"var 1 (train it{precise} before evaluating)")
        # any other tensor of the old layer (switchable norm's mixing logits): the same name and shape
        # in the new one is copied, anything else is reported as dropped
        handled = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
        for name, t in [*source.named_parameters(recurse=False), *source.named_buffers(recurse=False)]:
            if name in handled or t is None:
                continue
            u = getattr(target, name, None)
            if isinstance(u, torch.Tensor) and u.shape == t.shape:
                u.copy_(t)
                copied.append(name)
            else:
                dropped.append(f"{name}: {type(target).__name__} has no counterpart (what it held is lost)")
    return tuple(copied), tuple(dropped), tuple(notes)


def _hooks_note(source: nn.Module) -> Tuple[str, ...]:
    """Hooks registered on the replaced layer stay with it, not with its replacement."""
    kinds = [what for what, hooks in (("forward", source._forward_hooks), ("forward pre", source._forward_pre_hooks),
                                      ("backward", source._backward_hooks),
                                      ("backward pre", getattr(source, "_backward_pre_hooks", {}))) if hooks]
    if not kinds:
        return ()
    return (f"hooks: the old layer's {', '.join(kinds)} hook(s) are not carried over; register them on the new "
            f"layer",)


def _fastpath_note(places, target: nn.Module) -> Tuple[str, ...]:
    """torch's ``TransformerEncoderLayer``, in evaluation without gradients, runs a fused kernel
    that reads its norms' weight, bias and eps and computes LayerNorm itself, never calling them."""
    if isinstance(target, (nn.LayerNorm, nlnn.LayerNorm)):
        return ()  # the fused kernel computes what such a layer computes
    if not any(isinstance(parent, nn.TransformerEncoderLayer) for _, parent, _ in places):
        return ()
    return ("inside torch.nn.TransformerEncoderLayer: its fast path (evaluation without gradients) never calls this "
            "layer but computes a LayerNorm from its weight, bias and eps (a layer without a bias, such as RMSNorm, "
            "makes it fail); turn it off with torch.backends.mha.set_fastpath_enabled(False)",)


def _layout_note(source: nn.Module, seen: _Seen, target: nn.Module, to: str) -> Tuple[str, ...]:
    """The assumption convert made about a layer/RMS norm's input, or a BatchNorm1d's, when the target depends on it."""
    if not seen.assumed or isinstance(target, nn.Identity):
        return ()
    if seen.kind not in TRAILING:  # (N, C, L) assumed for a layer that takes (N, C) too
        try:
            make_norm(to, seen.channels, 0)
            return ()  # the target has an (N, C) form as well (the one built takes both, as the source did)
        except ValueError:
            pass
        return (f"layout: assumed its input is (N, {seen.channels}, L), as {type(source).__name__}'s class says; not "
                f"checked without example_input= or dim= ({type(source).__name__} also takes (N, {seen.channels}) "
                f"features, which the {type(target).__name__} does not: it refuses them, or takes a batch of "
                f"{seen.channels} as one unbatched (C, L) input; example_input= would refuse it)",)
    ns = _normalized_shape(source)
    if norm_kind(target) in TRAILING and _normalized_shape(target) == ns:
        return ()  # the same trailing normalized_shape: right whatever the layout
    if len(ns) > 1:
        layout = f"(N, {', '.join(map(str, ns))})"
    else:
        layout = f"(N, {ns[0]}" + (f", *{seen.dim} spatial dims)" if seen.dim else ")")
    return (f"layout: assumed its input is {layout}, its normalized dims being the channels; not checked without "
            f"example_input= (were they the trailing dims of a longer input such as (N, L, "
            f"{', '.join(map(str, ns))}), it would have no channel-first equivalent and example_input= would refuse "
            f"it)",)


Only = Union[None, str, type, Sequence[Union[str, type]], Callable[[str, nn.Module], bool]]


def _selector(only: Only) -> Callable[[str, nn.Module, str], bool]:
    if only is None:
        return lambda name, m, kind: True
    if callable(only) and not isinstance(only, type):
        return lambda name, m, kind: bool(only(name, m))
    items = [only] if isinstance(only, (str, type)) else list(only)
    kinds = {k for _, k in _classes()}
    for it in items:
        if isinstance(it, str) and it not in kinds:
            raise ValueError(f"convert(only=...): unknown kind {it!r}; expected one of {sorted(kinds)}, a class, or a "
                             f"function (name, module) -> bool")
    strs = {it for it in items if isinstance(it, str)}
    types = tuple(it for it in items if isinstance(it, type))
    return lambda name, m, kind: kind in strs or (bool(types) and isinstance(m, types))


def _input_shapes(model: nn.Module, modules: Dict[int, nn.Module], example_input) -> Dict[int, List[torch.Size]]:
    """The distinct shapes of the inputs each of ``modules`` receives on one forward of
    ``example_input``, in order (in eval mode, without gradients; the modes are restored)."""
    shapes: Dict[int, List[torch.Size]] = {}

    def hook(m, args):
        if args and isinstance(args[0], torch.Tensor):
            seen = shapes.setdefault(id(m), [])
            if args[0].shape not in seen:
                seen.append(args[0].shape)

    handles = [m.register_forward_pre_hook(hook) for m in modules.values()]
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            args = example_input if isinstance(example_input, tuple) else (example_input,)
            model(*args)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return shapes


def convert(model: nn.Module, to: str, *, only: Only = None, dim: Optional[int] = None, example_input=None,
            **kwargs) -> Tuple[nn.Module, List[Change]]:
    """Replace every normalization layer of ``model`` by the kind ``to`` names, in place.

    The replacement has the source's channel count, device, dtype and train/eval mode; γ/β
    (the same ``Parameter`` objects, so an optimizer built before keeps training them) and
    running statistics (copies) carry over where they mean the same (see the module docstring). Every
    replacement is built before any is put in place, so an error leaves ``model`` untouched.
    Layers that already are what ``to`` builds are left alone. A layer shared at several
    places is replaced by one shared layer.

    Args:
        model: any ``nn.Module``; if it is itself a normalization layer, the returned model is
            the new layer.
        to: a :func:`normlab.nn.make_norm` spec: ``"batch"``, ``"sync_batch"``, ``"group:32"``,
            ``"layer"``, ``"instance"``, ``"rms"``, ``"batch_renorm"``, ``"switchable"``,
            ``"masked_batch"``, ``"lrn:5"``, ``"none"`` (removes them) ...
        only: which layers to replace: a kind (``"batch"``), a class, a list of these, or a
            function ``(name, module) -> bool``. Default: every normalization layer.
        dim: spatial dims of every converted layer's (N, C, *) input (0 for (N, C), 2 for
            images); by default taken from the class (``BatchNorm2d`` -> 2) or the input.
        example_input: a tensor (or tuple of forward arguments) run once through ``model`` (in
            eval mode, no gradients, nothing updated) to read each layer's input shape. It
            tells the spatial dims of ``GroupNorm``/``SyncBatchNorm``, the channel count of
            ``LocalResponseNorm``, and whether a ``LayerNorm``'s input is (N, C, ...). A layer
            called on several input shapes is refused when the layer built for the first would
            refuse another (``BatchNorm1d`` for a ``GroupNorm`` also called on 4-D inputs).
            Without it a ``LayerNorm(C)``/``RMSNorm(C)`` is taken to normalize the channels of
            an (N, C) input (so ``convert(LayerNorm(8), "batch")`` builds ``BatchNorm1d(8)``
            even if the layer really sees (N, L, 8) tokens); the Change notes that assumption.
            A ``BatchNorm1d`` (or batch renorm, switchable, sync batch norm made from one) takes
            (N, C) and (N, C, L): it is taken as (N, C, L), noted where the target has no (N, C)
            form (``"instance"``, ``"masked_batch"``, ``"lrn"``).
        **kwargs: passed to the new layers (``process_group=``, ``momentum=``, ``rmax=`` ...);
            they win over what is carried over.

    Returns:
        ``(model, changes)``: the converted model and one :class:`Change` per replaced layer
        (what was copied, what was not and why, and ``notes``: assumptions and settings that
        could not carry over, e.g. a ``bias=False`` the new class cannot take).

    Raises:
        ValueError: an unknown spec or kind; a layer with no equivalent in ``to`` (the message
            names the layer and says why: e.g. ``LocalResponseNorm`` stores no channel count;
            ``MaskedBatchNorm1d`` takes a mask no other layer takes; with ``example_input``, a
            ``LayerNorm`` seen over the last dim of an (N, L, C) input has no channel-first
            twin — without ``example_input`` that layout is not detected, see above); a
            target that depends on an unknown number of spatial dims.

    Examples::

        >>> model, _ = convert(torchvision_resnet, "sync_batch")             # for data-parallel training
        >>> model, _ = convert(model, "batch")                               # and back (torch cannot)
        >>> model, changes = convert(model, "group:32")                      # BN -> GN, gamma/beta kept
        >>> model, _ = convert(transformer, "rms", only="layer")             # see the note on torch's fast path
        >>> print(*changes, sep="\\n")
    """
    if not isinstance(to, str) or not to.strip():
        raise ValueError(f"convert: 'to' must be a norm spec such as 'group:32' or 'batch', got {to!r}")
    spec_name = to.strip().lower().partition(":")[0]
    if spec_name not in norm_specs():
        raise ValueError(f"convert: unknown norm spec {to!r}; known: {', '.join(norm_specs())} "
                         f"(with an argument: 'group:G', 'lrn:size')")
    if dim is not None and dim not in (0, 1, 2, 3):
        raise ValueError(f"convert: dim is the number of spatial dims after (N, C) and must be 0, 1, 2 or 3, "
                         f"got {dim!r}")
    select = _selector(only)
    # every place (parent, attribute) each selected layer sits at, in order
    places: Dict[int, List[Tuple[str, Optional[nn.Module], str]]] = {}
    layers: Dict[int, Tuple[str, nn.Module, str]] = {}
    _collect(model, "", None, "", select, places, layers)
    if not layers:
        return model, []
    shapes = _input_shapes(model, {k: m for k, (_, m, _) in layers.items()}, example_input) \
        if example_input is not None else {}
    planned: Dict[int, Tuple[nn.Module, Change]] = {}
    for key, (name, module, kind) in layers.items():
        label = f"'{name or '<root>'}' ({type(module).__name__})"
        if kind == "masked_batch" and spec_name != "masked_batch":
            raise ValueError(f"convert: cannot replace {label} by {to!r}: it is called as layer(x, mask) and "
                             f"normalizes only the unmasked positions; no other layer takes that mask")
        if _is_lazy(module):
            raise ValueError(f"convert: {label} is a lazy module with no channel count yet; run one forward first")
        inputs = shapes.get(key, [])
        seen = _seen(module, kind, inputs[0] if inputs else None, dim)
        try:
            target = _build(to, seen, module, kind, dict(kwargs))
        except (ValueError, TypeError) as e:
            raise ValueError(f"convert: cannot replace {label} by {to!r}: {e}") from None
        problem = _layouts_problem(module, kind, target, inputs)
        if problem:
            raise ValueError(f"convert: cannot replace {label} by {to!r}: example_input called it on inputs of shapes "
                             f"{', '.join(str(tuple(s)) for s in inputs)}, and {problem}")
        if (type(target) is type(module) and target.extra_repr() == module.extra_repr()
                and getattr(target, "process_group", None) is getattr(module, "process_group", None)):
            continue
        target.to(**_tensors_like(module, model))
        copied, dropped, notes = _copy(module, kind, seen, target)
        target.train(module.training)
        notes += _layout_note(module, seen, target, to) + _fastpath_note(places[key], target) + _hooks_note(module)
        planned[key] = (target, Change(name, _describe(module, target), _describe(target, module), copied, dropped,
                                       notes))
    # every replacement exists: now put them in place
    for key, (target, _) in planned.items():
        for _, parent, attr in places[key]:
            if parent is None:
                model = target
            else:
                setattr(parent, attr, target)
    return model, [change for _, change in planned.values()]


def _is_lazy(module: nn.Module) -> bool:
    from torch.nn.modules.lazy import LazyModuleMixin

    return isinstance(module, LazyModuleMixin) and module.has_uninitialized_params()


def _describe(m: nn.Module, other: Optional[nn.Module] = None) -> str:
    """``Class(extra_repr)``; with the library's name in front when ``other`` has a class of the
    same name from another library (torch's BatchNorm2d -> normlab's)."""
    cls = type(m)
    qualified = other is not None and type(other).__name__ == cls.__name__ and type(other) is not cls
    lib = cls.__module__.split(".")[0]
    prefix = (f"{lib}.nn." if lib in ("torch", "normlab") else f"{cls.__module__}.") if qualified else ""
    return f"{prefix}{cls.__name__}({m.extra_repr()})"


def _collect(module, name, parent, attr, select, places, layers) -> None:
    kind = norm_kind(module)
    if kind is not None and select(name, module, kind):
        places.setdefault(id(module), []).append((name, parent, attr))
        layers.setdefault(id(module), (name, module, kind))
        return
    for child_attr, child in module._modules.items():  # not named_children(): it hides a child's second name
        if child is None:
            continue
        _collect(child, f"{name}.{child_attr}" if name else child_attr, module, child_attr, select, places, layers)
