"""Watch what every layer's activations and gradients do while a model trains.

Ioffe & Szegedy (2015) motivate batch norm with a figure: the {15, 50, 85}th percentiles of
the input to one sigmoid drifting over training without batch norm and staying put with it;
Glorot & Bengio (2010) watch sigmoid layers saturate. :func:`monitor` draws that picture for
any model: every ``every`` training steps it records, for each layer's output, the mean,
standard deviation, percentiles and a histogram, the fraction of saturated units after a
sigmoid or tanh, the fraction of dead units after a ReLU, and the gradient norms, as JSON
Lines; :meth:`Monitor.plot` draws per-layer histograms over time with the percentile lines.

Cost: on the steps in between, one Python call (a pre-hook on the model); the other hooks
exist only during recorded steps, which only capture what the records need (a copy of a
small output, sums taken on the device for a large one, gradient norms). The statistics,
percentiles, histograms and JSON lines of ``flush_every`` recorded steps are computed
together, so their fixed per-call cost is shared by the batch. Percentiles and histograms
use a fixed-size random sample of each output (the same random positions at every step);
mean, std and the saturated and dead fractions use all of it (reduced on the device for
outputs of more than 65536 values, in NumPy from a copy for smaller ones). NaN and inf are
counted (``nonfinite``) and kept out of the percentiles and histograms, their own layer's and
every other's. Finite outputs pay next to nothing for that: the min and max already taken,
and the first and last values of each sorted sample, show whether there is any to deal with;
only off the CPU is the count one more reduction, on the device, so that no step waits for it.

A module called several times in one forward (one ReLU object used in two places, a cell
stepped over time) is recorded at its first call of the step, gradient norm included: give
each use its own module to see every one.

Memory: the captures of up to ``flush_every`` recorded steps wait to be reduced: per
watched layer and step, a copy of its output when it has at most ``exact_limit`` values,
else ``sample`` values and a few sums; a batch is reduced early once they reach
``flush_bytes``.
"""
from __future__ import annotations

import contextlib
import json
import math
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

SKIPPED = (nn.Identity, nn.Flatten, nn.Unflatten, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
           nn.AlphaDropout)
SATURATING = {nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}
RECTIFIERS = (nn.ReLU, nn.ReLU6)
_HOST = ("cpu",)  # devices whose values Python reads without waiting for queued work
# |values| above this have float32 squares that overflow (or, summed, may): std is then taken in float64
# (on the host; on a GPU the float32 sum of squares overflows to inf past about 1e19)
_SQUARE_LIMIT = 1e18

Selection = Union[None, Iterable[str], Callable[[str, nn.Module], bool]]


def _activation(m: nn.Module) -> Optional[str]:
    for cls, name in SATURATING.items():
        if isinstance(m, cls):
            return name
    return "relu" if isinstance(m, RECTIFIERS) else None


class Monitor:
    """Per-layer activation and gradient statistics every ``every`` training steps.

    Use :func:`monitor` to make one. A *step* is one forward of the model in training mode
    (forwards in evaluation mode are neither counted nor recorded); steps 0, every,
    2·every, ... are recorded. A recorded step is complete once the next step starts (so the
    backward pass of the recorded step has run) or when the monitor closes.

    What a recorded step captured is reduced to records (and written to ``path``) in batches:
    every ``flush_every`` completed recorded steps, when the captures held reach ``flush_bytes``,
    when the monitor closes, and whenever :attr:`records` is read, so what you read there is
    never behind the steps completed so far (the file may be, by up to ``flush_every`` recorded
    steps, until the monitor closes).

    One record (one JSON line) per recorded layer and step::

        {"step": 20, "layer": "features.2", "type": "ReLU", "numel": 32768,
         "nonfinite": 0,    # how many of the numel values are NaN, inf or -inf
         "mean": .., "std": .., "min": .., "max": ..,          # over the whole output
         "percentiles": {"1": .., "15": .., "50": .., "85": .., "99": ..},   # the sample's finite values
         "hist": {"lo": .., "hi": .., "counts": [...]},        # `bins` equal bins, the same values
         "saturated": ..,   # sigmoid/tanh outputs: fraction with |y - centre| > saturation * half-range
         "zero": .., "dead": ..,  # ReLU outputs: fraction of zeros; fraction of units (dim 1) never > 0
         "grad_norm": ..,   # ||dL/dy|| of the layer's output, when it got a gradient
         "weight_grad_norm": ..}  # ||dL/dθ|| over the layer's own parameters, when it has any

    NaN and inf: ``nonfinite`` counts them in the whole output. ``mean``, ``std``, ``min`` and
    ``max`` take every value, so they are NaN or inf too when ``nonfinite > 0`` (JSON ``NaN``,
    ``Infinity``), and so may ``saturated``, ``zero`` and ``dead`` be; ``percentiles`` and
    ``hist`` describe the finite values of the sample (``None`` values and zero counts if it
    has none). Each layer's record comes from its own values only: one layer's NaN leaves the
    others' records as they would be without it. Finite float32 values past about 1e19, whose
    squares overflow float32, have their ``std`` taken in float64 on the CPU (on a GPU, a large
    output's ``std`` reads inf there).

    Only layers run inside the model's own forward are recorded (not an evaluation forward or a
    layer called on its own before the next step). Gradients: a step's backward pass may come
    after later forwards (several forwards, one loss: up to :attr:`HOLD_MAX` steps wait for it);
    ``weight_grad_norm`` is the norm of the
    parameters' ``.grad`` after it, so it includes what earlier steps accumulated when ``.grad``
    was not zeroed; with several backward passes in one step the last pass that wrote a watched
    parameter's gradient counts, and ``torch.autograd.grad`` passes are ignored (see ``_Backward``).
    Norms of float16/bfloat16 gradients are taken in float32.
    """

    PROBES = 64  # sizes whose sample positions are kept, at least (see _positions)

    def __init__(self, model: nn.Module, every: int = 10, path: Optional[str] = None, modules: Selection = None,
                 sample: int = 2048, percentiles: Sequence[float] = (1, 15, 50, 85, 99), bins: int = 50,
                 saturation: float = 0.98, seed: int = 0, exact_limit: int = 1 << 16, flush_every: int = 16,
                 flush_bytes: int = 32 << 20) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"monitor: every must be a positive int (record every N steps), got {every!r}")
        if not isinstance(flush_every, int) or flush_every < 1:
            raise ValueError(f"monitor: flush_every must be a positive int (recorded steps per batch), "
                             f"got {flush_every!r}")
        if sample < 2 or bins < 1:
            raise ValueError(f"monitor: sample must be >= 2 and bins >= 1, got sample={sample}, bins={bins}")
        if not all(0 <= p <= 100 for p in percentiles):
            raise ValueError(f"monitor: percentiles must lie in [0, 100], got {list(percentiles)}")
        if not 0 < saturation < 1:
            raise ValueError(f"monitor: saturation is a fraction of the output range in (0, 1), got {saturation}")
        self.model, self.every, self.path = model, every, path
        self.sample, self.bins, self.saturation = sample, bins, saturation
        self.flush_every, self.flush_bytes = flush_every, flush_bytes
        self.percentiles = tuple(sorted(float(p) for p in percentiles))
        self._percentile_keys = tuple(_fmt(p) for p in self.percentiles)
        self.layers = self._select(model, modules)
        if not self.layers:
            raise ValueError("monitor: no layer to watch (the selection matched no module)")
        self._watch = {id(m): (name, _activation(m), type(m).__name__) for name, m in self.layers.items()}
        self.step = 0
        self._records: List[dict] = []
        self.exact_limit = exact_limit
        self._gen = torch.Generator().manual_seed(seed)
        self._probe: Dict[tuple, object] = {}
        self._pending: Dict[str, dict] = {}
        self._pending_step: Optional[int] = None
        self._pending_bytes = 0
        # completed recorded steps, not yet reduced: (step, captures, gradient bookkeeping, bytes held)
        self._captured: List[Tuple[int, Dict[str, dict], Optional[_Backward], int]] = []
        self._rows: Dict[tuple, _Rows] = {}  # small outputs' copies, by shape, dtype, device and kind
        self._scratch: Dict[tuple, object] = {}  # NumPy work arrays, kept between batches
        self._transient: list = []
        self._params: List[Tuple[str, torch.Tensor]] = []  # (layer, parameter) of every watched layer
        self._backward: Optional[_Backward] = None  # the recorded step's gradient bookkeeping
        self._root = None
        self._file = None

    @staticmethod
    def _select(model: nn.Module, modules: Selection) -> Dict[str, nn.Module]:
        named = dict(model.named_modules())
        if modules is None:
            return {n: m for n, m in named.items() if not m._modules and not isinstance(m, SKIPPED)}
        if callable(modules):
            return {n: m for n, m in named.items() if modules(n, m)}
        names = list(modules)
        missing = [n for n in names if n not in named]
        if missing:
            raise ValueError(f"monitor: no module named {missing} in the model; names look like "
                             f"{[n for n in named if n][:6]}")
        return {n: named[n] for n in names}

    @property
    def records(self) -> List[dict]:
        """The records of every recorded step completed so far (reading this reduces the steps
        captured since the last batch; the step in progress joins once the next step starts, or
        once its backward pass has run if another forward came first)."""
        if self._captured:
            self._reduce(hold_late=True)
        return self._records

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> "Monitor":
        if self._root is not None:
            raise RuntimeError("monitor: this Monitor is already active")
        if self.path is not None:  # a Monitor used again goes on writing where it stopped
            self._file = open(self.path, "a" if self.step or self._records else "w")
        self._params = [(name, p) for name, m in self.layers.items() for p in m.parameters(recurse=False)]
        self._root = self.model.register_forward_pre_hook(self._on_forward)
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Reduce and write every recorded step and remove every hook (also done on leaving the ``with``)."""
        if self._root is not None:
            self._root.remove()
            self._root = None
        try:
            self._retire()
            self._reduce()
        finally:  # hooks and the file are let go even if the last reduction fails
            for _, _, backward, _ in self._captured:
                if backward is not None:
                    backward.release()
            self._captured = []
            self._rows, self._scratch = {}, {}
            if self._file is not None:
                self._file.close()
                self._file = None

    def _positions(self, n: int, device):
        """``sample`` random positions in an output of ``n`` values (with replacement), drawn once per
        size and device and then reused: a fixed random probe, so steps are compared on the same
        positions and no step pays for drawing them. The sizes used least recently are dropped
        beyond ``max(PROBES, 2 * watched layers)``: variable-length inputs (a new length every
        batch) would grow the cache without end, while every size of one step always fits, so a
        model's own sizes keep their positions from step to step."""
        key = (n, device)
        idx = self._probe.pop(key, None)  # re-inserted below: the dict's order is least recently used first
        if idx is None:
            idx = torch.randint(n, (self.sample,), generator=self._gen)
            idx = idx.numpy() if device is None else idx.to(device)
            if len(self._probe) >= max(self.PROBES, 2 * len(self.layers)):
                del self._probe[next(iter(self._probe))]
        self._probe[key] = idx
        return idx

    def _work(self, name: str, shape: tuple, dtype):
        """A NumPy work array, kept from one batch to the next: fresh large temporaries would cost
        page faults on every batch (the C allocator gives them back to the system)."""
        import numpy as np

        size = math.prod(shape)
        key = (name, np.dtype(dtype))
        buf = self._scratch.get(key)
        if buf is None or buf.size < size:
            buf = self._scratch[key] = np.empty(size, dtype)
        return buf[:size].reshape(shape)

    # -- hooks -----------------------------------------------------------------------------
    def _on_forward(self, model, args) -> None:
        if not model.training:
            return
        if self._pending_step is not None:
            self._retire()
        step = self.step
        self.step += 1
        if step % self.every == 0:
            self._pending_step = step
            # one process-wide forward hook for all watched layers (cheaper than one per layer, and
            # registered only for this step, so the steps in between pay nothing); gradients are
            # taken by hooks on this step's outputs and read at the end of its backward pass
            self._transient.append(nn.modules.module.register_module_forward_hook(self._on_output))
            # ... and only for the model's own forward: later forwards (an evaluation, a layer called
            # on its own) before the next step are not part of this step
            self._transient.append(model.register_forward_hook(self._forward_done, always_call=True))
            self._backward = _Backward(self._pending, self._params)

    def _forward_done(self, model, args, output) -> None:
        for h in self._transient:
            h.remove()
        self._transient = []

    def _on_output(self, module, args, output) -> None:
        watched = self._watch.get(id(module))
        if watched is None:
            return
        name, kind, type_name = watched
        y = output[0] if isinstance(output, (tuple, list)) and output else output
        if not isinstance(y, torch.Tensor) or not y.is_floating_point() or y.numel() == 0 or name in self._pending:
            return
        entry = self._stats(y.detach(), kind)
        entry["type"] = type_name
        self._pending[name] = entry
        if y.requires_grad:
            self._backward.watch(y, entry, large=entry["numel"] > self.exact_limit)

    def _stats(self, y: torch.Tensor, kind: Optional[str]) -> dict:
        """What the record needs from one output, taken now (the output may be changed in place later,
        e.g. by ReLU(inplace=True)) and left on the device until the step is reduced.

        An output of at most ``exact_limit`` values is copied whole and reduced in NumPy later, with
        the same layer's copies from the other steps of the batch (a NumPy call costs a fraction of a
        torch op on small arrays). A larger one is reduced here with sums and dot products, several
        times faster on the CPU than torch.std_mean or boolean counts: with d = y - shift (shift = the
        sample's mean, so no cancellation), mean = shift + sum(d)/n and var = d.d/n - (sum(d)/n)^2;
        saturated and dead counts from sign(); plus a random sample for percentiles and histogram."""
        n = y.numel()
        if n <= self.exact_limit:
            key = (y.shape, y.dtype, y.device, kind)
            rows = self._rows.get(key)
            if rows is None:
                rows = self._rows[key] = _Rows(y, kind, min(self.flush_every, 16) + 2)  # grows as needed
            self._pending_bytes += n * y.element_size()
            return {"numel": n, "_rows": rows, "_row": rows.put(y)}
        with torch.no_grad():
            return self._sums(y, n, kind)

    def _sums(self, y: torch.Tensor, n: int, kind: Optional[str]) -> dict:
        flat = y.reshape(-1)
        sample = flat[self._positions(n, flat.device)]
        self._pending_bytes += sample.numel() * sample.element_size()
        acc = torch.float64 if flat.dtype == torch.float64 else torch.float32
        lo, hi = torch.aminmax(flat)  # NaN if any value is NaN
        nonfinite = None
        host = flat.device.type in _HOST
        if host:  # reading min and max costs nothing here: count only if one is not finite
            lo_, hi_ = lo.item(), hi.item()
            finite = math.isfinite(lo_) and math.isfinite(hi_)
            nonfinite = 0 if finite else n - int(torch.isfinite(flat).sum())
            if finite and max(-lo_, hi_) > _SQUARE_LIMIT:  # squares would overflow float32: take them in float64
                acc = torch.float64
        shift = sample.to(acc).mean()
        d = flat.to(acc) - shift
        raw = [shift, d.sum(), torch.dot(d, d), lo.to(acc), hi.to(acc)]
        keys = ["_shift", "_s1", "_s2", "min", "max"]
        if not host:  # reading them would wait for the device: count on it, in the batch's one transfer
            raw.append(torch.isfinite(flat).logical_not_().sum(dtype=acc))  # exact up to 2**24 in float32
            keys.append("nonfinite")
        if kind in ("sigmoid", "tanh"):
            centre, half = (0.5, 0.5 * self.saturation) if kind == "sigmoid" else (0.0, self.saturation)
            raw.append(d.add_(shift - centre).abs_().sub_(half).sign_().sum())  # +1 saturated, -1 not, 0 on the edge
            keys.append("_sat")
        elif kind == "relu":  # outputs >= 0: sign() is 1 where the unit fired
            raw.append(flat.sign().sum(dtype=acc))
            keys.append("_fired")
            if y.dim() >= 2:  # a unit (channel or feature, dim 1) is dead if it is 0 for every sample and position
                top = y.amax(dim=[i for i in range(y.dim()) if i != 1])
                raw.append(top.sign().sum(dtype=acc))
                keys.append("_alive")
        dt = raw[0].dtype
        return {"numel": n, "_sample": sample, "_raw": torch.stack([r.to(dt) for r in raw]), "_keys": keys,
                "_units": y.shape[1] if y.dim() >= 2 else 0, "_nonfinite": nonfinite}

    def _retire(self) -> None:
        """The recorded step's forward is over (the next step started, or the monitor closes): queue
        what it captured; reduce the queue once it holds ``flush_every`` steps or ``flush_bytes`` of
        captures."""
        self._forward_done(None, None, None)
        step, pending, held, backward = self._pending_step, self._pending, self._pending_bytes, self._backward
        self._pending, self._pending_step, self._pending_bytes, self._backward = {}, None, 0, None
        if step is None or not pending:
            if backward is not None:
                backward.release()
            return
        self._captured.append((step, pending, backward, held))
        if backward is not None:
            backward.retired = True
            if not _late(self._captured[-1]):  # its backward has run: later passes (a leaf output, a kept
                backward.release()             # graph) belong to later steps
        late = len(self._late_steps())
        if len(self._captured) - late >= self.flush_every or sum(c[3] for c in self._captured) >= self.flush_bytes:
            self._reduce(hold_late=True)

    # at most this many steps wait for one backward pass (a loss over several forwards); more, and the
    # oldest are taken as never getting one (a training-mode forward whose loss is not backpropagated)
    HOLD_MAX = 64

    def _late_steps(self) -> list:
        """The queued steps that wait for a backward pass: the last ones, those after every step whose
        backward has run (a backward that ran for a later step will not come for an earlier one), at
        most :attr:`HOLD_MAX` of them and ``flush_bytes`` of captures."""
        late, held = [], 0
        for c in reversed(self._captured):
            held += c[3]
            if not _late(c) or len(late) == self.HOLD_MAX or (late and held > self.flush_bytes):
                break
            late.append(c)
        return late[::-1]

    def _reduce(self, hold_late: bool = False) -> None:
        """Records from every queued step at once: the same layer's outputs over the batch's steps
        are reduced in one NumPy call, all samples sorted in one, all scalars and gradient norms
        brought to the host in one transfer per device.

        ``hold_late``: keep the last queued steps back while their backward pass has not run (several
        forwards before one backward: a GAN's discriminator on real and fake data, the views of a
        contrastive or triplet loss), so their gradient norms are not lost."""
        held = self._late_steps() if hold_late else []
        captured = self._captured[:len(self._captured) - len(held)]
        self._captured = held
        if not captured:
            return
        for _, _, backward, _ in captured:
            if backward is not None:
                backward.release()

        layout = [(step, name, e) for step, pending, _, _ in captured for name, e in pending.items()]
        scalars: list = [None] * len(layout)
        blocks = []  # (record indices, 2-D array, one row each, and the sample's positions in a row or None: all)
        sums: Dict[tuple, List[int]] = {}  # large outputs: the sums taken on the device
        copies: Dict[_Rows, List[int]] = {}  # small outputs: rows 0, 1, ... of their buffer, in order
        for i, (_, _, e) in enumerate(layout):
            rows = e.get("_rows")
            if rows is not None:
                copies.setdefault(rows, []).append(i)
            else:
                r = e["_raw"]
                sums.setdefault((r.dtype, r.device), []).append(i)
        for idx in sums.values():  # one transfer per device and dtype
            es = [layout[i][2] for i in idx]
            flat = torch.cat([e["_raw"] for e in es]).cpu().tolist()
            at = 0
            for i, e in zip(idx, es):
                k = len(e["_keys"])
                scalars[i] = _from_sums(dict(zip(e["_keys"], flat[at:at + k])), e["numel"], e["_units"])
                if e["_nonfinite"] is not None:
                    scalars[i]["nonfinite"] = e["_nonfinite"]
                at += k
            by_len: Dict[tuple, List[int]] = {}
            for i, e in zip(idx, es):
                t = e["_sample"]
                by_len.setdefault((t.numel(), t.dtype, t.device), []).append(i)
            for sub in by_len.values():
                blocks.append((sub, _to_numpy(torch.stack([layout[i][2]["_sample"] for i in sub])), None))
        for rows, idx in copies.items():  # one layer, or layers alike, over the batch's steps: one NumPy call
            a = _to_numpy(rows.buf[:len(idx)]).reshape(len(idx), -1)
            for i, out in zip(idx, _exact(a, rows.shape, rows.kind, self.saturation, self._work)):
                scalars[i] = out
            blocks.append((idx, a, self._positions(a.shape[1], None) if a.shape[1] > self.sample else None))
        # every gradient norm of the batch in one transfer per device
        norms: Dict[object, list] = {}
        for i, (_, _, e) in enumerate(layout):
            g = e.get("_grad")
            if g is not None:
                norms.setdefault(g.device, []).append((i, True, g))
            for t in e.get("_param_grads", ()):
                norms.setdefault(t.device, []).append((i, False, t))
        for group in norms.values():
            values = torch.stack([t.float() for _, _, t in group]).cpu().tolist()
            for (i, is_output, _), v in zip(group, values):
                if is_output:
                    scalars[i]["grad_norm"] = v
                else:
                    scalars[i]["weight_grad_norm"] = math.hypot(scalars[i].get("weight_grad_norm", 0.0), v)
        q, hists = _percentiles_and_histograms(blocks, len(layout), self.percentiles, self.bins, self._work)
        # the step in progress and a held step keep their copies: move them to the front of their buffers
        for rows, idx in copies.items():
            rows.drop(len(idx), [e for pending in [self._pending] + [c[1] for c in held] for e in pending.values()])
        # keep the buffers of the shapes this batch saw (or the step in progress holds): with
        # variable-length inputs, one buffer per shape ever seen would grow without bound
        self._rows = {k: r for k, r in self._rows.items() if r in copies or r.used}
        keys, records, encode = self._percentile_keys, self._records, _ENCODER.encode
        lines = []
        for (step, name, e), scal, qs, hist in zip(layout, scalars, q, hists):
            rec = {"step": step, "layer": name, "type": e["type"], "numel": e["numel"],
                   "nonfinite": scal.pop("nonfinite"),
                   "mean": scal.pop("mean"), "std": scal.pop("std"), "min": scal.pop("min"), "max": scal.pop("max"),
                   "percentiles": dict(zip(keys, qs)), "hist": hist}
            rec.update(scal)
            records.append(rec)
            if self._file is not None:
                lines.append(encode(rec))
        if lines:
            self._file.write("\n".join(lines) + "\n")
            self._file.flush()

    # -- output ----------------------------------------------------------------------------
    def plot(self, out_png: str, layers: Optional[Sequence[str]] = None, title: Optional[str] = None,
             **kwargs) -> str:
        """Draw per-layer histograms over time (see :func:`plot_records`); returns ``out_png``."""
        return plot_records(self.records, out_png, layers=layers, title=title, **kwargs)


# the output of json.dumps(rec, separators=(",", ":")), without building an encoder per record
_ENCODER = json.JSONEncoder(separators=(",", ":"), check_circular=False)


def _exact(a, shape: tuple, kind: Optional[str], saturation: float, work) -> list:
    """Scalars of whole outputs of one shape and kind, a: (R, n), all rows at once (sums accumulate
    in float64; temporaries in ``work`` arrays)."""
    import numpy as np

    rows, n = a.shape
    lo, hi = a.min(axis=1).tolist(), a.max(axis=1).tolist()  # NaN if the row holds one
    finite = all(map(math.isfinite, lo + hi))
    # NaN or inf make a row's mean and std NaN or inf (see nonfinite): without warnings
    with contextlib.nullcontext() if finite else np.errstate(invalid="ignore", over="ignore"):
        mean = a.mean(axis=1, dtype=np.float64)
        if finite and max(map(abs, lo + hi)) > _SQUARE_LIMIT and a.dtype != np.float64:
            d = a - mean[:, None]  # float64: the squares of these overflow float32
        else:
            d = np.subtract(a, mean[:, None].astype(a.dtype), out=work("d", a.shape, a.dtype))
        std = np.sqrt(np.square(d, out=d).sum(axis=1, dtype=np.float64) / n)
    outs = [{"mean": m, "std": s, "min": mn, "max": mx, "nonfinite": 0}
            for m, s, mn, mx in zip(mean.tolist(), std.tolist(), lo, hi)]
    if not finite:  # rare: count the NaN and inf of the rows that have some
        for j, out in enumerate(outs):
            if not (math.isfinite(lo[j]) and math.isfinite(hi[j])):
                out["nonfinite"] = n - int(np.count_nonzero(np.isfinite(a[j])))
    found = {}
    if kind in ("sigmoid", "tanh"):
        if kind == "sigmoid":
            dev, half = np.abs(np.subtract(a, 0.5, out=d), out=d), 0.5 * saturation
        else:
            dev, half = np.abs(a, out=d), saturation
        mask = np.greater(dev, half, out=work("mask", a.shape, np.bool_))
        found["saturated"] = (np.count_nonzero(mask, axis=1) / n).tolist()
    elif kind == "relu":
        found["zero"] = (1.0 - np.count_nonzero(np.not_equal(a, 0, out=work("mask", a.shape, np.bool_)), axis=1)
                         / n).tolist()
        if len(shape) >= 2:  # per unit (dim 1): the largest value over the batch and positions
            top = a.reshape((rows,) + tuple(shape)).max(axis=(1,) + tuple(range(3, len(shape) + 1)))
            found["dead"] = (np.count_nonzero(top <= 0, axis=1) / shape[1]).tolist()
    for key, values in found.items():
        for out, v in zip(outs, values):
            out[key] = v
    return outs


def _late(captured: tuple) -> bool:
    """A queued step whose outputs wait for a gradient that no backward pass has given yet."""
    backward = captured[2]
    return backward is not None and backward.watched and not backward.ended


_LOW = (torch.float16, torch.bfloat16)


def _norms(tensors: List[torch.Tensor]) -> List[torch.Tensor]:
    """2-norms, one ``torch._foreach_norm`` per kind; float32 for half types (a float16 norm
    overflows past 65504, routine under a loss scale); sparse gradients by their values."""
    tensors = [t.coalesce()._values() if t.is_sparse else t for t in tensors]
    out: List[Optional[torch.Tensor]] = [None] * len(tensors)
    for low in (False, True):
        idx = [i for i, t in enumerate(tensors) if (t.dtype in _LOW) == low]
        if idx:
            group = [tensors[i].float() if low else tensors[i] for i in idx]
            for i, n in zip(idx, torch._foreach_norm(group)):
                out[i] = n
    return out


class _Backward:
    """The gradient norms of one recorded step: ||dL/dy|| of each watched output, from a hook on the
    autograd node that made it, and ||dL/dθ|| of the watched layers' parameters, read once a
    backward pass has ended (one callback, queued by the first output hook to run, instead of a
    hook per parameter to register, call and remove).

    Several backward passes in one step (``retain_graph=True``, one loss after another): each
    pass that writes a watched parameter's ``.grad`` replaces the step's norms, so the record
    holds the output gradients of the last such pass and the parameters' ``.grad`` after it (as
    the optimizer will see it, including what earlier micro-batches accumulated). A pass that
    writes no watched parameter's gradient (``torch.autograd.grad``, a gradient penalty's inner
    pass) is ignored, unless the watched layers have no parameters at all."""

    def __init__(self, entries: Dict[str, dict], params: List[Tuple[str, torch.Tensor]]) -> None:
        self.entries, self.waiting, self.queued, self.handles = entries, [], False, []
        self.watched, self.ended, self.retired = False, False, False
        self.params = [(name, p) for name, p in params if p.requires_grad]
        self.start = self.before = self._grads()

    def _grads(self) -> list:
        # a parameter's gradient was written by a pass if it was None before, or is another tensor,
        # or the same one changed in place (accumulated)
        return [(g, None if g is None else g._version) for _, p in self.params for g in (p.grad,)]

    @staticmethod
    def _changed(before, now) -> list:
        return [g is not None and (g is not g0 or g._version != v0) for (g0, v0), (g, _) in zip(before, now)]

    def watch(self, y: torch.Tensor, entry: dict, large: bool) -> None:
        self.watched = True
        fn = y.grad_fn
        if fn is None:  # a leaf: only a tensor hook sees its gradient
            self.handles.append(y.register_hook(lambda g: self._got(entry, g, large)))
        else:  # the node's pre-hook sees the gradients of all its outputs (cheaper than a tensor hook)
            nr = y.output_nr
            self.handles.append(fn.register_prehook(lambda grads: self._got(entry, grads[nr], large)))

    def release(self) -> None:
        """Remove the hooks (once the step is reduced: its backward may run after the next forward)."""
        for h in self.handles:
            h.remove()
        self.handles = []

    def _got(self, entry: dict, g: Optional[torch.Tensor], large: bool) -> None:
        if g is not None:
            # a large gradient is reduced now: keeping it to the end would raise peak memory
            self.waiting.append((entry, _norms([g])[0] if large else g, large))
        if not self.queued:
            self.queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._ended)

    def _ended(self) -> None:
        self.queued = False
        waiting, self.waiting = self.waiting, []
        now = self._grads()
        wrote = any(self._changed(self.before, now))
        self.before = now
        if self.params and not wrote:  # not the loss's backward pass (see the class docstring)
            return
        self.ended = True
        if self.retired:  # a late backward (after the next forward): the step is over now
            self.release()
        for entry, g, is_norm in waiting:
            if is_norm:
                entry["_grad"] = g
        small = [(entry, g) for entry, g, is_norm in waiting if not is_norm]
        tensors, owners = [g for _, g in small], [(entry, "_grad") for entry, _ in small]
        for entry in self.entries.values():
            entry.pop("_param_grads", None)
        for (name, _), (g, _), changed in zip(self.params, now, self._changed(self.start, now)):
            entry = self.entries.get(name)
            if entry is not None and changed:
                tensors.append(g)
                owners.append((entry, None))
        if tensors:
            for (entry, key), norm in zip(owners, _norms(tensors)):
                if key is None:
                    entry.setdefault("_param_grads", []).append(norm)
                else:
                    entry[key] = norm


class _Rows:
    """Copies of small outputs of one shape, dtype, device and activation kind, one per row of a
    buffer kept from batch to batch (no allocation per capture, one array to reduce)."""

    def __init__(self, y: torch.Tensor, kind: Optional[str], capacity: int) -> None:
        self.shape, self.kind, self.used = tuple(y.shape), kind, 0
        with torch.inference_mode(False):  # a buffer made in inference mode could not be written outside it
            self.buf = torch.empty((capacity,) + self.shape, dtype=y.dtype, device=y.device)

    def put(self, y: torch.Tensor) -> int:
        if torch.is_inference_mode_enabled():  # (checked first: entering the mode costs more than a copy)
            with torch.inference_mode(False):
                return self._put(y)
        return self._put(y)

    def _put(self, y: torch.Tensor) -> int:
        k = self.used
        if k == self.buf.shape[0]:
            grown = self.buf.new_empty((2 * k,) + self.shape)
            grown[:k].copy_(self.buf)
            self.buf = grown
        self.buf[k].copy_(y)
        self.used = k + 1
        return k

    @torch.inference_mode(False)
    def drop(self, count: int, pending: Iterable[dict]) -> None:
        """Rows [0, count) are reduced; move what is left (the step in progress) to the front."""
        left = self.used - count
        if left:
            self.buf[:left].copy_(self.buf[count:self.used].clone())
            for e in pending:
                if e.get("_rows") is self:
                    e["_row"] -= count
        self.used = left


def _from_sums(raw: dict, n: int, units: int) -> dict:
    """The scalars of a large output from the sums its hook took on the device."""
    m1 = raw["_s1"] / n
    out = {"mean": raw["_shift"] + m1, "std": max(raw["_s2"] / n - m1 * m1, 0.0) ** 0.5,
           "min": raw["min"], "max": raw["max"]}
    if "nonfinite" in raw:
        out["nonfinite"] = int(raw["nonfinite"])
    if "_sat" in raw:
        out["saturated"] = (raw["_sat"] + n) / (2 * n)
    if "_fired" in raw:
        out["zero"] = 1 - raw["_fired"] / n
    if "_alive" in raw:
        out["dead"] = 1 - raw["_alive"] / units
    return out


def _percentiles_and_histograms(blocks: list, count: int, percentiles: tuple, bins: int, work):
    """Percentiles (linear interpolation, as numpy.percentile) and equal-width histograms of the
    finite values of each sample; blocks = [(record indices, 2-D array, positions)]: row j of the
    array holds record j's values, its sample those at ``positions`` (None: all). Samples of the
    same length are done together in one sort.

    A sample with NaN or inf (found from two columns of the sorted rows: -inf sorts first, +inf
    and NaN last) is taken out of the batch and done alone on its finite values (percentiles
    None and no counts if it has none), so it cannot disturb the others."""
    import numpy as np

    q_out, h_out = [None] * count, [None] * count
    by_len: Dict[int, list] = {}
    for rows, a, at in blocks:
        by_len.setdefault(a.shape[1] if at is None else len(at), []).append((rows, a, at))
    p = np.asarray(percentiles, dtype=np.float64) / 100
    for length, group in by_len.items():
        rows = [i for r, _, _ in group for i in r]
        a = work("sorted", (len(rows), length), np.result_type(*[b for _, b, _ in group]))
        start = 0
        for _, b, at in group:
            if at is None:
                a[start:start + len(b)] = b
            else:
                np.take(b, at, axis=1, out=a[start:start + len(b)], mode="clip")  # in range: clip = raise, unbuffered
            start += len(b)
        a.sort(axis=1)  # (R, length)
        bad, held = [], None
        if not all(map(math.isfinite, a[:, 0].tolist() + a[:, -1].tolist())):
            bad = np.flatnonzero(~(np.isfinite(a[:, 0]) & np.isfinite(a[:, -1]))).tolist()
            held = a[bad]
            a[bad] = 0  # these rows are done below; zeros keep every other row in its place (and its result)
        qs, los, his, counts = _sorted_rows(a, p, bins, work)
        for j, row in zip(bad, () if held is None else held):
            finite = row[np.isfinite(row)]  # still sorted
            if finite.size:
                (qs[j],), (los[j],), (his[j],), (counts[j],) = _sorted_rows(finite[None, :], p, bins, work)
            else:
                qs[j], los[j], his[j], counts[j] = [None] * len(p), None, None, [0] * bins
        for j, i in enumerate(rows):
            q_out[i] = qs[j]
            h_out[i] = {"lo": los[j], "hi": his[j], "counts": counts[j]}
    return q_out, h_out


def _sorted_rows(a, p, bins: int, work) -> tuple:
    """Percentiles at fractions ``p``, lowest and highest bin edges and bin counts of each row of
    ``a`` (R, L), sorted and finite, as lists."""
    import numpy as np

    length = a.shape[1]
    pos = p * (length - 1)
    lo_i = np.floor(pos).astype(np.int64)
    hi_i = np.minimum(lo_i + 1, length - 1)
    q = a[:, lo_i] + (a[:, hi_i] - a[:, lo_i]) * (pos - lo_i)
    lo, hi = a[:, 0].astype(np.float64), a[:, -1].astype(np.float64)
    flat = ~(hi > lo)  # a constant sample: one unit-wide range around it
    lo[flat], hi[flat] = lo[flat] - 0.5, lo[flat] + 0.5
    # histogram of sorted rows: rescale row j to [2j, 2j + 1], so all rows and their bin edges
    # form one sorted sequence, and count with one searchsorted
    shift = 2.0 * np.arange(len(a))[:, None]
    t = np.subtract(a, lo[:, None], out=work("t", a.shape, np.float64))
    t = np.add(np.divide(t, (hi - lo)[:, None], out=t), shift, out=t).ravel()
    edges = np.linspace(0.0, 1.0, bins + 1)[None, :] + shift
    idx = np.concatenate([np.searchsorted(t, edges[:, :-1].ravel(), side="left").reshape(len(a), bins),
                          np.searchsorted(t, edges[:, -1], side="right")[:, None]], axis=1)
    return q.tolist(), lo.tolist(), hi.tolist(), np.diff(idx, axis=1).tolist()


def _to_numpy(t: torch.Tensor):
    t = t.detach().cpu()
    return (t if t.dtype in (torch.float32, torch.float64) else t.float()).numpy()


def _fmt(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p)


def monitor(model: nn.Module, every: int = 10, path: Optional[str] = None, modules: Selection = None,
            **kwargs) -> Monitor:
    """Record per-layer activation statistics and gradient norms every ``every`` training steps.

    A context manager: hooks are in place inside the ``with`` block and gone after it. See
    :class:`Monitor` for the record's fields.

    Args:
        model: the model; each forward in training mode is one step.
        every: record steps 0, every, 2·every, ... Default 10.
        path: write JSON Lines here (one line per layer and recorded step); ``None`` keeps
            the records in memory only (``.records``). Either way ``.records`` holds every
            record (about 2 KB per layer and recorded step with the default 50 bins): for a
            long run, raise ``every`` or pass ``modules`` to bound it.
        modules: which layers: ``None`` = every leaf module except Identity, Flatten and
            Dropout; a list of names; or a function ``(name, module) -> bool``.
        **kwargs: ``sample`` (values per layer for percentiles and histograms, default 2048),
            ``percentiles`` (default (1, 15, 50, 85, 99)), ``bins`` (50), ``saturation``
            (0.98: a sigmoid output below 0.01 or above 0.99, a tanh output beyond ±0.98, is
            saturated), ``seed``, ``exact_limit`` (outputs up to this many values, default
            65536, are copied and reduced in NumPy; larger ones are reduced on their device),
            ``flush_every`` (reduce and write recorded steps this many at a time, default 16;
            ``.records`` is always up to date, the file at the latest when the ``with`` ends),
            ``flush_bytes`` (reduce earlier once the captures held reach this size, 32 MiB).

    Examples::

        >>> with monitor(model, every=10, path="run/monitor.jsonl") as mon:
        ...     for x, y in loader:
        ...         opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()
        >>> mon.plot("run/monitor.png")
    """
    return Monitor(model, every=every, path=path, modules=modules, **kwargs)


def load_records(path: str) -> List[dict]:
    """The records of a JSON Lines file written by :func:`monitor`."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_records(records: Union[str, List[dict]], out_png: str, layers: Optional[Sequence[str]] = None,
                 title: Optional[str] = None, max_layers: int = 24, dpi: int = 110) -> str:
    """One panel per layer: the histogram of its outputs at every recorded step (a column per
    step, darker = more values, square-root scale) with the 15th/50th/85th percentiles drawn over it as in
    Ioffe & Szegedy (2015), Fig. 1 (those of them the records hold); the panel title gives the last saturated or dead
    fraction. A last panel shows each layer's output-gradient norm over time.

    Args:
        records: records from :attr:`Monitor.records` or a JSON Lines path.
        out_png: where to save the figure.
        layers: which layers (default: all recorded, in order, at most ``max_layers``).
        title: a title for the figure.
        max_layers: draw at most this many layers when ``layers`` is not given.
        dpi: resolution of the PNG.
    """
    try:  # a Figure without pyplot: draws off-screen and leaves the caller's backend alone
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("monitor plots need matplotlib: pip install matplotlib "
                          "(or normlab[lab], which brings it)") from e
    import numpy as np

    if isinstance(records, str):
        records = load_records(records)
    if not records:
        raise ValueError("plot_records: no records to plot (was the model trained inside the monitor?)")
    by_layer: Dict[str, List[dict]] = {}
    for r in records:
        by_layer.setdefault(r["layer"], []).append(r)
    names = list(layers) if layers is not None else list(by_layer)[:max_layers]
    unknown = [n for n in names if n not in by_layer]
    if unknown:
        raise ValueError(f"plot_records: no records for layer(s) {unknown}; recorded: {list(by_layer)}")
    n_panels = len(names) + 1
    ncols = min(4, n_panels)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.0 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, name in zip(axes.flat, names):
        recs = sorted(by_layer[name], key=lambda r: r["step"])
        steps = np.array([r["step"] for r in recs], dtype=float)
        pkeys = list(recs[0]["percentiles"])
        # None: no finite value in that step's sample (see nonfinite)
        plo = min((r["percentiles"][pkeys[0]] for r in recs if r["percentiles"][pkeys[0]] is not None), default=0.0)
        phi = max((r["percentiles"][pkeys[-1]] for r in recs if r["percentiles"][pkeys[-1]] is not None),
                  default=plo)
        if not phi > plo:
            phi = plo + 1e-6
        pad = 0.05 * (phi - plo)
        grid = np.linspace(plo - pad, phi + pad, 61)
        image = np.zeros((len(grid) - 1, len(recs)))
        for j, r in enumerate(recs):
            if r["hist"]["lo"] is None:  # nothing finite to draw
                continue
            # re-bin onto the panel's grid through the piecewise-linear CDF (no aliasing stripes)
            counts = np.asarray(r["hist"]["counts"], dtype=float)
            edges = np.linspace(r["hist"]["lo"], r["hist"]["hi"], len(counts) + 1)
            if edges[-1] <= edges[0]:
                edges = edges[0] + np.linspace(-1e-9, 1e-9, len(counts) + 1)
            cdf = np.concatenate([[0.0], np.cumsum(counts)]) / max(counts.sum(), 1.0)
            image[:, j] = np.diff(np.interp(grid, edges, cdf, left=0.0, right=1.0))
        dx = steps[1] - steps[0] if len(steps) > 1 else 1.0
        ax.imshow(np.sqrt(image), origin="lower", aspect="auto", cmap="Greys",
                  extent=(steps[0] - dx / 2, steps[-1] + dx / 2, grid[0], grid[-1]))
        for key, style in zip(("15", "50", "85"), ("--", "-", "--")):
            if key in recs[0]["percentiles"]:
                ax.plot(steps, np.array([r["percentiles"][key] for r in recs], dtype=float), style, color="C3", lw=1.2,
                        label=f"{key}th pct")
        last = recs[-1]
        extra = "".join(f", {k} {last[k]:.0%}" for k in ("saturated", "dead") if k in last)
        extra += f", {last['nonfinite']} NaN/inf" if last.get("nonfinite") else ""
        ax.set_title(f"{name} ({last['type']}){extra}", fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    if axes.flat[0].get_legend_handles_labels()[0]:  # records without the 15/50/85th percentiles draw no lines
        axes.flat[0].legend(fontsize=7, loc="upper left")
    gax = axes.flat[len(names)]
    for name in names:
        recs = sorted(by_layer[name], key=lambda r: r["step"])
        pts = [(r["step"], r["grad_norm"]) for r in recs if r.get("grad_norm")]
        if pts:
            gax.plot(*zip(*pts), lw=1, label=name)
    gax.set_yscale("log")
    gax.set_title("||dL/d output|| per layer", fontsize=9)
    gax.set_xlabel("step", fontsize=8)
    gax.tick_params(labelsize=7)
    if len(names) <= 10 and gax.lines:
        gax.legend(fontsize=6)
    for ax in list(axes.flat)[n_panels:]:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(out_png, dpi=dpi)
    return out_png
