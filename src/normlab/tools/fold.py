"""Fold evaluation-mode batch norm into the convolution or linear layer before it.

In evaluation, batch norm is a fixed per-channel affine map of its input,
``y = (x - mean) * s + beta`` with ``s = gamma / sqrt(var + eps)`` from the running statistics.
When ``x = W * u + b`` comes from a convolution or linear layer, the two collapse into one
layer with

    W' = W * s   (along W's output-channel axis)        b' = (b - mean) * s + beta

so a deployed model skips the normalization entirely. Output channels sit on axis 0 of a
``Conv``/``Linear`` weight (out, in/groups, ...) and on axis 1 of a ``ConvTranspose`` weight
(in, out/groups, ...), group by group.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from normlab.tools.convert import _input_shapes, _is_lazy, norm_kind

CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
FOLDABLE_INTO = CONVS + TRANSPOSED + (nn.Linear,)
# layers that are y = (x - running_mean) / sqrt(running_var + eps) * weight + bias in evaluation
FOLDABLE_KINDS = ("batch", "sync_batch", "batch_renorm")


@dataclass
class FoldReport:
    """What :func:`fold` did: ``folded`` holds (batch norm, layer it went into) names; ``left``
    holds (batch norm, why it stayed) for each one left in place; ``method`` is
    ``"modules"`` (only Sequential neighbours: the model keeps its class) or ``"fx"`` (the model
    became a ``torch.fx.GraphModule``). It says what was returned, not what was asked for:
    ``fold(method="fx")`` reports ``"modules"`` when hooks the graph would drop keep the model
    untraced."""

    folded: List[Tuple[str, str]] = field(default_factory=list)
    left: List[Tuple[str, str]] = field(default_factory=list)
    method: str = "modules"

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} batch norm layer(s) ({self.method}), left {len(self.left)}"]
        lines += [f"  {bn} -> {into}" for bn, into in self.folded]
        lines += [f"  left {bn}: {why}" for bn, why in self.left]
        return "\n".join(lines)


def _is_bn(m: nn.Module) -> bool:
    return norm_kind(m) in FOLDABLE_KINDS


def _why_not_foldable_bn(bn: nn.Module) -> Optional[str]:
    if bn.running_mean is None or bn.running_var is None:
        return "it has no running statistics (track_running_stats=False), so evaluation uses batch statistics"
    return None


def _along_out(layer: nn.Module, w: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``w * v`` with the per-output-channel vector ``v`` broadcast along ``w``'s output channels
    (axis 0 of a Conv/Linear weight; axis 1, group by group, of a ConvTranspose weight)."""
    if isinstance(layer, TRANSPOSED):
        g = layer.groups
        cin, cout_g, k = w.shape[0], w.shape[1], w.shape[2:]
        return (w.view(g, cin // g, cout_g, *k) * v.view(g, 1, cout_g, *([1] * len(k)))).view(w.shape)
    return w * v.view(-1, *([1] * (w.dim() - 1)))


@torch.no_grad()
def _folded(layer: nn.Module, bn: nn.Module) -> Tuple[torch.Tensor, torch.Tensor, Optional[str]]:
    """``(W', b', why)``: the folded weight and bias in the layer's dtype, computed in float64
    (float32 on MPS) and rounded once, and why they must not replace the layer's (None: they may).

    They must not when rounding to the layer's dtype turns a finite value into inf (or NaN):
    ``s = gamma / sqrt(var + eps)`` reaches 100 for a variance of 1e-4, and float16 holds at
    most 65504. Values already non-finite in the layer or the batch norm are not counted: the
    original pair is not finite there either."""
    w = layer.weight
    acc = torch.float64 if w.device.type != "mps" else torch.float32
    scale = (bn.running_var.to(acc) + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.to(acc)
    shift = -bn.running_mean.to(acc) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(acc)
    wa = _along_out(layer, w.to(acc), scale)
    b = layer.bias.to(acc) if layer.bias is not None else torch.zeros_like(scale)
    ba = b * scale + shift
    w_new, b_new = wa.to(w.dtype), ba.to(w.dtype)
    if w.device.type == "meta":  # no values, so nothing to check (the fold changes only the model's structure)
        return w_new, b_new, None
    if bool(torch.isfinite(w_new).all()) and bool(torch.isfinite(b_new).all()):
        return w_new, b_new, None
    # non-finite results whose inputs (the weight, s; the bias, s, running mean, beta) were finite
    ok_scale = torch.isfinite(scale)
    bad_w = ~torch.isfinite(w_new) & _along_out(layer, torch.isfinite(w), ok_scale)
    bad_b = ~torch.isfinite(b_new) & ok_scale & torch.isfinite(b) & torch.isfinite(shift)
    found = [f"the folded {what} reaches {vals.abs()[bad].max().item():.3g}"
             for what, vals, bad in (("weight", wa, bad_w), ("bias", ba, bad_b)) if bool(bad.any())]
    if not found:
        return w_new, b_new, None
    name = str(w.dtype).replace("torch.", "")
    return w_new, b_new, (f"folding would overflow {name}: {' and '.join(found)}, but {name} holds at most "
                          f"{torch.finfo(w.dtype).max:.5g}, so the folded layer would compute inf or NaN where this "
                          f"pair is finite")


@torch.no_grad()
def fold_pair_(layer: nn.Module, bn: nn.Module) -> None:
    """Fold the evaluation-mode batch norm ``bn`` into ``layer`` (Conv, ConvTranspose or Linear), in place.

    Computed in float64 and rounded once to the layer's dtype; a layer without bias gets one.

    Raises:
        ValueError: the folded layer would not compute ``bn(layer(x))`` (a batch norm in training
            mode or without running statistics, channel counts that differ, a weight or bias
            computed by a parametrization or pruning, a subclass with its own forward, a Linear
            before a 2d/3d batch norm), or the
            folded weight or bias overflows the layer's dtype (float16 past 65504) where the
            originals are finite; nothing is changed then.
    """
    why = _fold_problem(layer, bn)
    if why is None:
        w_new, b_new, why = _folded(layer, bn)
    if why is not None:
        raise ValueError(f"fold_pair_: {why}")
    w = layer.weight
    w.copy_(w_new)
    if layer.bias is None:
        layer.bias = nn.Parameter(b_new, requires_grad=w.requires_grad)
    else:
        layer.bias.copy_(b_new)


def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


# the methods a layer's output comes from: a subclass that overrides one computes something else
# (a weight-standardized conv may override ``_conv_forward`` and keep ``forward``)
_COMPUTING = ("forward", "_conv_forward")


def _own_forward(m: nn.Module) -> Optional[Tuple[str, str]]:
    """``(subclass, library class)`` when a subclass of torch's or normlab's layer gives ``m`` a
    ``forward`` (or a conv's ``_conv_forward``) of its own (a weight-standardized conv, a scaled
    batch norm, an Identity that scales): the folding formula holds only for the library's
    forward. None when the forward is the library's."""
    custom = None
    for cls in type(m).__mro__:
        if cls.__module__.startswith(("torch.nn.", "normlab.nn")):
            return None if custom is None else (custom, cls.__name__)
        if custom is None and any(name in cls.__dict__ for name in _COMPUTING):
            custom = cls.__name__
    return None


def _has_forward_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _has_backward_hooks(m: nn.Module) -> bool:
    return bool(m._backward_hooks or m._backward_pre_hooks)


def _passes_through(m: nn.Module) -> bool:
    """An ``nn.Identity`` that the layer's output crosses unchanged and unseen on its way to the
    batch norm: torch's own forward and no hook (a hook there, even one that only reads, would
    see the normalized values, or their gradients, once the pair is one layer)."""
    return (isinstance(m, nn.Identity) and _own_forward(m) is None and not _has_forward_hooks(m)
            and not _has_backward_hooks(m))


def _bn_ranks(bn: nn.Module) -> Tuple[int, ...]:
    """The input ranks a batch norm accepts (empty: any, or unknown)."""
    if isinstance(bn, nn.BatchNorm2d):
        return (4,)
    if isinstance(bn, nn.BatchNorm3d):
        return (5,)
    return tuple(getattr(bn, "_ranks", ()))


def _fold_problem(layer: nn.Module, bn: nn.Module) -> Optional[str]:
    """Why the folded layer would not compute ``bn(layer(x))`` whatever the model around the two
    (None: it would), overflow aside (:func:`_folded`)."""
    if not isinstance(layer, FOLDABLE_INTO):
        return f"{type(layer).__name__} is not a Conv, ConvTranspose or Linear"
    if not _is_bn(bn):
        return f"{type(bn).__name__} is not a batch norm"
    if bn.training:
        return "the batch norm is in training mode, where it normalizes with batch statistics; call eval() first"
    for m, what in ((layer, "the layer"), (bn, "the batch norm")):
        if _is_lazy(m):
            return f"{what} is a lazy module with no parameters yet; run one forward first"
        custom = _own_forward(m)
        if custom is not None:
            return (f"{what} is a {custom[0]}, which defines its own forward: the folded weight and bias would go "
                    f"through it, and the formula holds only for {custom[1]}'s")
    if _out_channels(layer) != bn.num_features:
        return (f"{type(layer).__name__} has {_out_channels(layer)} output channels but the batch norm has "
                f"{bn.num_features}")
    if isinstance(layer, nn.Linear):
        ranks = _bn_ranks(bn)
        if ranks and 2 not in ranks:
            # a Linear's features are its output's last dim; a 2d/3d batch norm normalizes dim 1 of a 4-D/5-D
            # tensor, never that dim: whatever the shapes, the pair is no per-output-feature map
            return (f"a {type(bn).__name__} normalizes dim 1 of a {'/'.join(f'{r}-D' for r in sorted(ranks))} "
                    f"input, which is never the Linear's output features (its last dim)")
    # a weight or bias the layer does not hold (a Parameter; a bias may also be a buffer, or None) is computed
    # before each forward (a parametrization; torch.nn.utils.prune and the old weight_norm set a plain tensor
    # from a pre-hook): the folded values written into it would be overwritten at the next call
    held = {"weight": isinstance(layer._parameters.get("weight"), nn.Parameter),
            "bias": isinstance(layer._parameters.get("bias"), nn.Parameter) or "bias" in layer._buffers
            or layer.bias is None}
    for name in ("weight", "bias"):
        if parametrize.is_parametrized(layer, name) or not held[name]:
            return (f"its layer's {name} is computed (a parametrization such as weight_norm or spectral_norm, "
                    f"pruning, or a hook): remove it first (torch.nn.utils.parametrize.remove_parametrizations, "
                    f"torch.nn.utils.prune.remove)")
    return _why_not_foldable_bn(bn)


def _pair_problem(layer: nn.Module, bn: nn.Module, owners: Dict[int, int], seen: set) -> Optional[str]:
    """Why ``bn`` cannot fold into ``layer`` (None: it can). ``owners`` counts, per parameter, the
    modules that hold it (:func:`_owner_counts`); ``seen`` holds the ranks of the inputs ``bn``
    got on the example inputs (:func:`_input_ranks`; empty without them)."""
    problem = _fold_problem(layer, bn)
    if problem is not None:
        return problem
    if isinstance(layer, nn.Linear) and seen - {2}:
        # a Linear's features are its output's last dim; batch norm normalizes dim 1, which is a
        # feature only for (N, features): on (N, L, features) the pair is no per-feature map
        return (f"on the example inputs it normalizes a {max(seen - {2})}-D tensor, whose dim 1 is not the "
                f"Linear's output features (its last dim)")
    for name in ("weight", "bias"):
        p = layer._parameters.get(name)
        if p is not None and owners.get(id(p), 0) > 1:
            return f"its layer's {name} is shared with another module (tied weights)"
    return _hook_problem(layer, bn) or _folded(layer, bn)[2]


def _hook_problem(layer: nn.Module, bn: nn.Module) -> Optional[str]:
    """Hooks that act between the layer's output and the batch norm's (a forward hook on the
    layer, any hook on the batch norm, a global module hook: clipping, quantization observers,
    monitors) would see or change different values after folding, and the batch norm's hooks
    would be lost with it. Backward hooks too: the layer's would get the gradient of the batch
    norm's output instead of its own. A pre-forward hook on the layer acts before it and stays
    valid."""
    from torch.nn.modules import module as torch_module

    hooks = []
    if layer._forward_hooks:
        hooks.append(f"a forward hook on its {type(layer).__name__}")
    if _has_backward_hooks(layer):
        hooks.append(f"a backward hook on its {type(layer).__name__}")
    if _has_forward_hooks(bn) or _has_backward_hooks(bn):
        hooks.append("a forward, pre-forward or backward hook on the batch norm")
    if any(getattr(torch_module, f"_global_{kind}", None) for kind in (
            "forward_hooks", "forward_pre_hooks", "backward_hooks", "backward_pre_hooks")):
        hooks.append("a global module forward or pre-forward hook, or backward hook (torch.nn.modules.module."
                     "register_module_forward_hook, _forward_pre_hook, _full_backward_hook, _full_backward_pre_hook)")
    if not hooks:
        return None
    return (f"{' and '.join(hooks)} would see or change other values once the pair is one layer; remove the hooks "
            f"before folding")


def _identity_problem(name: str, m: nn.Module) -> str:
    """Why an Identity between a layer and its batch norm stops the fold (see :func:`_passes_through`)."""
    custom = _own_forward(m)
    if custom is not None:
        return (f"{name} between it and the layer before is a {custom[0]}, which defines its own forward: the "
                f"batch norm cannot move past it")
    return (f"{name} (Identity) between it and the layer before has a hook, which would see the normalized values "
            f"(or their gradients) once the pair is one layer; remove the hook before folding")


def _graph_hook_problem(tracer: fx.Tracer, graph: fx.Graph) -> Optional[str]:
    """Hooks a traced graph would drop: tracing runs the forward of the root and of every module
    that is not a leaf (they become plain operations in the graph), so hooks on those modules
    either ran once while tracing (one that records) or are not in the graph at all (the
    root's). Hooks on leaf modules stay: the graph calls those modules."""
    leaves = {n.target for n in graph.nodes if n.op == "call_module"}
    hooked = []
    for name, m in tracer.root.named_modules():
        inside_leaf = any(name == leaf or name.startswith(leaf + ".") for leaf in leaves)
        if not inside_leaf and (_has_forward_hooks(m) or _has_backward_hooks(m)):
            hooked.append(name or "the model itself")
    if not hooked:
        return None
    shown = ", ".join(hooked[:3]) + (f" and {len(hooked) - 3} more" if len(hooked) > 3 else "")
    return (f"hooks on {shown}, which torch.fx traces through (the folded graph would not keep them); remove them "
            f"or use method='modules'")


def _check_eval(model: nn.Module) -> None:
    training = [name or "<root>" for name, m in model.named_modules() if _is_bn(m) and m.training]
    if training:
        shown = ", ".join(training[:5]) + (f" and {len(training) - 5} more" if len(training) > 5 else "")
        raise ValueError(f"fold needs the model in evaluation mode (batch norm folds with its running statistics), "
                         f"but {shown} {'is' if len(training) == 1 else 'are'} in training mode; call model.eval() "
                         f"first")


def _use_counts(model: nn.Module) -> Dict[int, int]:
    counts: Dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        counts[id(m)] = counts.get(id(m), 0) + 1
    return counts


def _owner_counts(model: nn.Module) -> Dict[int, int]:
    """Per parameter (by id), how many distinct modules hold it: more than one means tied weights."""
    owners: Dict[int, set] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        for p in m._parameters.values():
            if p is not None:
                owners.setdefault(id(p), set()).add(id(m))
    return {k: len(v) for k, v in owners.items()}


def _input_ranks(model: nn.Module, example_input) -> Dict[str, set]:
    """Per batch norm (by qualified name), the ranks of the inputs it gets on ``example_input``."""
    bns = {id(m): m for m in model.modules() if _is_bn(m)}
    shapes = _input_shapes(model, bns, example_input)
    return {name: {len(s) for s in shapes[id(m)]} for name, m in model.named_modules(remove_duplicate=False)
            if id(m) in shapes}


def _fold_sequential(model: nn.Module, report: FoldReport, graph: Optional[FoldReport] = None,
                     ranks: Optional[Dict[str, set]] = None) -> None:
    """Fold [..., layer, (Identity ...,) bn, ...] inside every nn.Sequential; each folded bn becomes Identity.

    A plain Identity (a batch norm folded already; no hook, torch's forward) passes the layer on,
    so consecutive batch norms all fold.
    Only containers that run ``nn.Sequential.forward`` itself count (a subclass with its own
    ``forward`` may use its layers any way). ``graph`` (a dry run of :func:`_fold_fx` on the
    model, when it can be traced) vets each pair: the walk sees one container, the graph sees
    the whole model (a layer also called directly, its output used twice, its weight read)."""
    uses, owners, ranks = _use_counts(model), _owner_counts(model), ranks or {}
    vetted = None if graph is None else set(graph.folded)
    why_not = {} if graph is None else dict(graph.left)
    for name, seq in list(model.named_modules()):
        if not isinstance(seq, nn.Sequential) or type(seq).forward is not nn.Sequential.forward:
            continue
        last = None  # key of the Conv/Linear whose output reaches this position unchanged
        for key, m in list(seq._modules.items()):
            if isinstance(m, FOLDABLE_INTO):
                last = key
                continue
            if _passes_through(m):  # (an Identity with a hook or its own forward ends the pair, as any module)
                continue
            if not _is_bn(m) or last is None:
                last = None
                continue
            layer, bn_name, layer_name = seq._modules[last], _join(name, key), _join(name, last)
            problem = _pair_problem(layer, m, owners, ranks.get(bn_name, set()))
            if problem is None and (uses.get(id(layer), 0) > 1 or uses.get(id(m), 0) > 1):
                problem = f"{layer_name} or the batch norm is shared with another place in the model"
            if problem is None and vetted is not None and (bn_name, layer_name) not in vetted:
                problem = why_not.get(bn_name, f"the traced model does not apply it to the output of {layer_name} "
                                               f"alone")
            if problem is not None:
                report.left.append((bn_name, problem))
                last = None
                continue
            fold_pair_(layer, m)
            seq._modules[key] = nn.Identity()
            report.folded.append((bn_name, layer_name))


class _LeafTracer(fx.Tracer):
    """Keeps normlab's layers (which check shapes in Python) and every torch.nn layer as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return type(m).__module__.startswith("normlab.") or super().is_leaf_module(m, qualname)


def _fold_fx(model: nn.Module, report: FoldReport, apply: bool = True, ranks: Optional[Dict[str, set]] = None
             ) -> Optional[nn.Module]:
    """Trace the graph and fold each batch norm whose input is the single-use output of a Conv/Linear.

    With ``apply=False`` nothing changes: ``report`` gets the pairs that would fold and why the
    rest would not (the vetting for :func:`_fold_sequential`), and None is returned. With
    ``apply=True`` and hooks the graph would drop (:func:`_graph_hook_problem`), nothing
    changes either: every batch norm is reported left, and None is returned."""
    tracer = _LeafTracer()
    graph = tracer.trace(model)
    modules = dict(tracer.root.named_modules())
    if apply:
        problem = _graph_hook_problem(tracer, graph)
        if problem is not None:
            bns = dict.fromkeys(n.target for n in graph.nodes if n.op == "call_module" and _is_bn(modules[n.target]))
            report.left += [(name, problem) for name in bns]
            return None
    calls: Dict[str, int] = {}
    read: set = set()  # modules whose parameter values the forward reads directly (self.conv.weight * 2)
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
        elif node.op == "get_attr" and any(not _metadata_only(u) for u in node.users):
            read.add(node.target.rpartition(".")[0])
    uses, owners, ranks = _use_counts(model), _owner_counts(model), ranks or {}
    passed: set = set()  # batch norms a dry run would fold: later ones see through them
    handled: set = set()  # batch norm calls already folded along with an earlier one
    for node in list(graph.nodes):
        if node in handled or node.op != "call_module" or not _is_bn(modules[node.target]):
            continue
        if node.kwargs or len(node.args) != 1:  # bn(input=x): its input is not where the graph walk looks
            report.left.append((node.target, "it is called with keyword or extra arguments"))
            continue
        bn = modules[node.target]
        src = _unchanged_from(node.args[0], modules, passed)
        fed_by_layer = isinstance(src, fx.Node) and src.op == "call_module"
        if fed_by_layer and isinstance(modules[src.target], nn.Identity) and not _passes_through(modules[src.target]):
            inner = _unchanged_from(src.args[0] if src.args else None, modules, passed)
            if (isinstance(inner, fx.Node) and inner.op == "call_module"
                    and isinstance(modules[inner.target], FOLDABLE_INTO)):  # a layer would feed it but for this
                report.left.append((node.target, _identity_problem(src.target, modules[src.target])))
                continue
        if not (fed_by_layer and isinstance(modules[src.target], FOLDABLE_INTO)):
            what = _describe_node(src, modules)
            report.left.append((node.target, f"its input comes from {what}, not from a Conv, ConvTranspose or Linear"))
            continue
        layer = modules[src.target]
        problem = _pair_problem(layer, bn, owners, ranks.get(node.target, set()))
        if problem is None and len(src.users) > 1:
            others = ", ".join(str(u) for u in src.users if u is not node)
            problem = f"the output of {src.target} is also used by {others}"
        group = [node]  # the batch norm calls this fold removes
        if problem is None and calls[src.target] > 1:
            # a layer called several times (a Sequential applied twice, in a loop) folds only if
            # every one of its calls feeds this batch norm and nothing else
            feeds = [n for n in graph.nodes if n.op == "call_module" and n.target == src.target]
            group = [next(iter(n.users)) for n in feeds if len(n.users) == 1]
            if not (len(group) == len(feeds) and node in group and all(
                    u.op == "call_module" and u.target == node.target and u.args == (f,) and not u.kwargs
                    for u, f in zip(group, feeds))):
                problem = f"{src.target} is applied at more than one place, not each time followed by {node.target}"
        if problem is None and uses.get(id(layer), 0) > 1:
            problem = f"{src.target} is applied at more than one place"
        if problem is None and src.target in read:
            problem = f"the forward also reads the parameters of {src.target} directly"
        if problem is not None:
            report.left.append((node.target, problem))
            continue
        report.folded.append((node.target, src.target))
        handled.update(group)
        if not apply:
            passed.update(group)
            continue
        fold_pair_(layer, bn)
        for u in group:
            u.replace_all_uses_with(u.args[0])
            graph.erase_node(u)
    if not apply:
        return None
    gm = fx.GraphModule(tracer.root, graph, type(model).__name__)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm


def _unchanged_from(src, modules: Dict[str, nn.Module], passed: set):
    """Where the value ``src`` comes from: back through what hands it on unchanged and unseen (a plain
    Identity, a batch norm a dry run folds already: ``passed``), each used only on this path."""
    while (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1 and src.args
           and (src in passed or _passes_through(modules[src.target]))):
        src = src.args[0]
    return src


_METADATA = {"dtype", "shape", "device", "ndim", "is_cuda", "requires_grad", "layout"}


def _metadata_only(use: fx.Node) -> bool:
    """Whether this use of a parameter reads only what folding keeps (its dtype, shape, device)."""
    if use.op == "call_function" and use.target is getattr:
        return len(use.args) > 1 and use.args[1] in _METADATA
    return use.op == "call_method" and use.target in ("size", "dim")


def _describe_node(src, modules) -> str:
    if not isinstance(src, fx.Node):
        return f"the constant {src!r}"
    if src.op == "placeholder":
        return "the model's input"
    if src.op == "call_module":
        return f"{src.target} ({type(modules[src.target]).__name__})"
    if src.op == "call_function":
        return f"the function {getattr(src.target, '__name__', src.target)}"
    return f"{src.op} {src.target}"


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def fold(model: nn.Module, inplace: bool = False, method: str = "auto", strict: bool = False,
         example_input=None) -> Tuple[nn.Module, FoldReport]:
    """Fold every evaluation-mode batch norm into the Conv/ConvTranspose/Linear that feeds it.

    ``W' = W * s`` along the output channels and ``b' = (b - running_mean) * s + beta``, with
    ``s = gamma / sqrt(running_var + eps)``, computed in float64 and rounded once to the layer's
    dtype (float16 and bfloat16 layers included). Works for Conv1d/2d/3d and
    ConvTranspose1d/2d/3d (grouped or not, with or without bias) and Linear, followed by
    ``BatchNorm*d``, ``SyncBatchNorm`` or batch renorm (torch's or normlab's), which all
    compute that map in evaluation. A folded batch norm disappears (``nn.Identity`` in a
    Sequential; removed from an fx graph).

    Two ways to find the pairs:

    - ``"modules"``: neighbours inside ``nn.Sequential`` containers; the model keeps its class.
      It trusts that the layers of a plain ``nn.Sequential`` are used only through it.
    - ``"fx"``: trace the model with ``torch.fx`` and fold every batch norm whose input is the
      output of a Conv/Linear used nowhere else, in any graph (residual blocks, custom
      ``forward``); the result is a ``torch.fx.GraphModule``.
    - ``"auto"`` (default): ``"modules"`` first, each pair vetted against the traced graph
      (a Conv also called on its own, or whose output or weight is used elsewhere, is not
      folded); if batch norms remain, ``"fx"`` on the rest. If the model cannot be traced
      (data-dependent control flow), the Sequential folds stand, trusting that the layers in
      a plain ``nn.Sequential`` are used only through it, and the rest is reported as left.

    Never folded (left in place, with the reason in the report): a layer whose weight or bias is
    computed (a parametrization such as weight_norm or spectral_norm, pruning) or is tied to
    another module's, a batch norm without running statistics, a lazy module not yet run, a
    layer used at several places (a batch norm used after several layers is folded into each
    of them by ``"fx"``, which reports each pair, and left by ``"modules"``), a pair with a
    hook between its two halves (a forward or backward hook on the layer, any hook on the batch
    norm or on an Identity between them, a global module hook: it would see or change other
    values), a layer (or Identity between the two) whose subclass overrides ``forward`` (or a
    conv's ``_conv_forward``), any pair for a traced graph when the model itself or a module
    that fx traces through (not a leaf: a custom block) has hooks, which the graph would not
    keep (then ``"fx"`` folds nothing and ``"auto"`` keeps the Sequential folds), a batch norm
    the traced forward never calls (one used only in training), and a pair whose folded
    weight or bias overflows the layer's dtype where the originals are finite (float16 holds
    at most 65504: a weight of 1000 over a running variance of 1e-4 folds to 1e5), which
    would make the folded layer compute inf where the pair did not. On the ``meta`` device
    only the structure folds (there are no values to check).

    Note: a ``Linear`` is folded with the ``BatchNorm1d`` after it when the norm's channels are
    the Linear's output features, i.e. for (N, features) activations. fold never sees the
    activations' shapes unless given ``example_input``: a model that applies the pair to
    (N, L, features) tensors (the norm over L, not per output feature) is left when L differs
    from the Linear's output features, but where they happen to be equal only
    ``example_input`` shows it (the batch norm's input is then 3-D, and the pair is left). A Linear
    before a 2d/3d batch norm (``BatchNorm2d``, ``BatchRenorm3d`` ...) is always left: the norm
    normalizes dim 1 of a 4-D/5-D tensor, never the Linear's features (its last dim).

    Args:
        model: a model in evaluation mode (``model.eval()``).
        inplace: change ``model`` itself instead of a deep copy. Default False. ``model`` then
            holds the folds found in its Sequential containers (their batch norms become
            ``Identity``); pairs only the fx graph finds are folded in the returned
            ``GraphModule`` alone, so ``model`` stays correct either way. With ``method="fx"``
            ``model`` is left as it was (the folds are all in the returned ``GraphModule``).
        method: ``"auto"``, ``"modules"`` or ``"fx"``.
        strict: raise if any batch norm is left unfolded. Default False (left in place and
            reported). With ``inplace=True`` (and a method other than ``"fx"``) the pairs that
            could be folded already are when it raises (the model computes what it did; pass a
            copy to keep it untouched).
        example_input: a tensor (or tuple of forward arguments) run once through the model
            (without gradients), as :func:`~normlab.tools.convert`'s: a Linear -> BatchNorm1d
            pair whose norm gets more than 2-D inputs there is left (see the note). Default
            None: shapes are not checked.

    Returns:
        ``(folded_model, report)``: the model (in evaluation mode) and a :class:`FoldReport`.

    Raises:
        ValueError: a batch norm is in training mode; ``strict`` and one could not be folded
            (the message says why: no Conv/Linear before it, that layer's output used
            elsewhere, no running statistics ...); an unknown ``method``; ``method="fx"`` and
            the model cannot be traced.

    Examples::

        >>> model.eval()
        >>> deployed, report = fold(model)
        >>> print(report)        # folded 20 batch norm layer(s) (fx), left 0
        >>> torch.testing.assert_close(deployed(x), model(x))
    """
    if method not in ("auto", "modules", "fx"):
        raise ValueError(f"fold: method must be 'auto', 'modules' or 'fx', got {method!r}")
    _check_eval(model)
    out = model if inplace else copy.deepcopy(model)
    ranks = {} if example_input is None else _input_ranks(out, example_input)
    report = FoldReport(method="modules")
    if _is_bn(out):
        report.left.append(("<root>", "the model is a single batch norm layer; nothing feeds it"))
        method = "modules"
    if method in ("auto", "modules"):
        graph = None
        if method == "auto" and not _is_bn(out):  # vet the walk's pairs against the whole traced model
            graph = FoldReport()
            try:
                _fold_fx(out, graph, apply=False, ranks=ranks)
            except Exception:  # cannot be traced: the walk trusts the Sequential containers
                graph = None
        _fold_sequential(out, report, graph, ranks)
    remaining = [name or "<root>" for name, m in out.named_modules() if _is_bn(m)]
    if method == "fx" or (method == "auto" and remaining):
        by_walk = report.folded
        fx_report = FoldReport(folded=list(by_walk), method="fx")
        try:
            # with inplace, ``model`` keeps only the walk's folds (each batch norm became Identity):
            # folding the graph's pairs in it too would change its layers' weights while its own
            # forward still applied those batch norms
            traced = _fold_fx(copy.deepcopy(out) if inplace else out, fx_report, ranks=ranks)
        except Exception as e:  # torch.fx raises many kinds on untraceable code
            if method == "fx":
                raise ValueError(f"fold: torch.fx cannot trace {type(model).__name__}: {type(e).__name__}: {e}; "
                                 f"use method='modules' to fold Sequential neighbours only") from e
            done = {b for b, _ in report.left}
            why = (f"not right after a Conv/Linear in a Sequential, and torch.fx could not trace the model "
                   f"({type(e).__name__}: {str(e)[:200]})")
            report.left += [(name, why) for name in remaining if name not in done]
        else:
            if traced is None:  # hooks the graph would drop: the walk's model stands
                done = {b for b, _ in report.left}
                report.left += [(b, why) for b, why in fx_report.left if b not in done]
            elif method == "fx" or len(fx_report.folded) > len(by_walk):
                out, report = traced, fx_report
            else:  # fx found nothing more: keep the model's class, with fx's reasons for what is left
                report.left = fx_report.left
    elif remaining:
        done = {b for b, _ in report.left}
        report.left += [(name, "not in a Sequential right after a Conv/ConvTranspose/Linear (method='modules')")
                        for name in remaining if name not in done]
    # a batch norm the traced graph never calls (used only in training, or not at all) gets no reason from fx but
    # stays in the model: it is left all the same (and strict says so)
    done = {b for b, _ in report.left}
    report.left += [(name or "<root>", "the traced forward (in evaluation mode) never calls it")
                    for name, m in out.named_modules() if _is_bn(m) and (name or "<root>") not in done]
    out.eval()
    if strict and report.left:
        raise ValueError("fold(strict=True): batch norm layer(s) could not be folded:\n" + "\n".join(
            f"  {bn}: {why}" for bn, why in report.left))
    return out, report


