"""Shared test utilities: tolerances, comparisons, finite differences, twin-module training.

Every helper lives here once; test files import what they need (``from helpers import ...``,
``tests/`` is on ``pythonpath``).
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import pytest
import torch

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run a module's tests on one intra-op thread (import this fixture into a test module to
    activate it). The tensors here are tiny: on the shared 2-core machine torch's 2-thread
    parallel regions cost far more than they save (measured: the batch norm tests took 2x the
    wall time and 2x the CPU time with 2 threads). Restored afterwards for other modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# float64 against float64: the two sides differ only in summation order, so agreement to
# ~1e-12 relative is expected; 1e-9 leaves room for sums of a few hundred terms.
TOL64 = dict(rtol=1e-9, atol=1e-9)
# central differences in float64 with step 1e-6: truncation error ~h^2 * f''' ~ 1e-12,
# cancellation error ~ 1e-16 * |f| / h ~ 1e-10 for losses of order 1-10.
TOL_FD = dict(rtol=1e-5, atol=1e-6)

# Low-precision inputs against the float64 result from the same rounded inputs. Criterion per
# element: |y - y64| <= atol * max(1, |y64|).
#   float16: 10 mantissa bits; rounding the output alone costs up to 2^-11 |y| ~ 4.9e-4 |y|.
#     2e-3 leaves 4x that for the float32 statistics, yet rejects torch's native CPU half
#     batch norm (~0.03 error) and instance norm (~0.3) by 10x or more.
#   bfloat16: 7 mantissa bits; output rounding alone is up to 2^-8 |y| ~ 3.9e-3 |y|, so 1.6e-2
#     (4 half-ulps) still flags any error that comes from the statistics rather than the rounding.
LOWP_ATOL = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, np.float16: 2e-3}


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def randn(shape, seed: int, scale: float = 1.0, shift: float = 0.0) -> np.ndarray:
    """A float64 NumPy array of normal values."""
    return rng(seed).standard_normal(shape) * scale + shift


def t(a, requires_grad: bool = False, dtype=F64) -> torch.Tensor:
    """NumPy -> torch (a copy), optionally a leaf that requires grad."""
    out = torch.tensor(np.asarray(a), dtype=dtype)
    return out.requires_grad_(requires_grad)


def n(x) -> np.ndarray:
    """torch/NumPy/None -> NumPy float64 (None stays None)."""
    if x is None:
        return None
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(F64).numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def assert_close(actual, expected, rtol: float = TOL64["rtol"], atol: float = TOL64["atol"], what: str = ""):
    """Element-wise ``|a - e| <= atol + rtol |e|`` on NumPy or torch values (shapes must match;
    ``None`` must match ``None``)."""
    if expected is None or actual is None:
        assert actual is None and expected is None, f"{what}: one side is None ({actual is None}, {expected is None})"
        return
    a, e = n(actual), n(expected)
    assert a.shape == e.shape, f"{what}: shape {a.shape} != {e.shape}"
    np.testing.assert_allclose(a, e, rtol=rtol, atol=atol, err_msg=what)


def lowp_error(y, y64) -> float:
    """Largest ``|y - y64| / max(1, |y64|)``: the quantity :data:`LOWP_ATOL` bounds."""
    y, y64 = n(y), n(y64)
    return float(np.max(np.abs(y - y64) / np.maximum(1.0, np.abs(y64))))


def assert_lowp_close(y, y64, dtype, what: str = ""):
    err = lowp_error(y, y64)
    tol = LOWP_ATOL[dtype]
    assert np.isfinite(err) and err <= tol, f"{what}: {dtype} error {err:.3g} > {tol:g} * max(1, |y|)"


def big_mean_input(shape, dtype, seed: int = 0) -> torch.Tensor:
    """``1000 + randn`` rounded to ``dtype``: a mean large against the spread, the case where
    one-pass variance or low-precision accumulation fails."""
    return torch.from_numpy(randn(shape, seed, shift=1000.0)).to(dtype)


def finite_diff(f: Callable[..., np.ndarray], arrays: Sequence[np.ndarray], dy: np.ndarray, h: float = 1e-6):
    """Central differences of ``sum(f(*arrays) * dy)`` with respect to each array (float64)."""
    arrays = [np.array(a, dtype=np.float64, copy=True) for a in arrays]
    grads = []
    for a in arrays:
        g = np.zeros_like(a)
        flat, gflat = a.reshape(-1), g.reshape(-1)
        for i in range(flat.size):
            old = flat[i]
            flat[i] = old + h
            up = float(np.sum(f(*arrays) * dy))
            flat[i] = old - h
            down = float(np.sum(f(*arrays) * dy))
            flat[i] = old
            gflat[i] = (up - down) / (2 * h)
        grads.append(g)
    return grads


def torch_grads(fn: Callable[..., torch.Tensor], inputs: Sequence, dy) -> tuple:
    """``(y, [d sum(y * dy) / d input for each input])`` via torch autograd; inputs may be NumPy
    arrays or None (their gradient is None)."""
    leaves = [None if a is None else t(a, requires_grad=True) for a in inputs]
    y = fn(*leaves)
    y.backward(t(dy))
    return y.detach(), [None if a is None else a.grad for a in leaves]


def run_twins(
    ours: torch.nn.Module,
    theirs: torch.nn.Module,
    make_input: Callable[[int], torch.Tensor],
    steps: int = 3,
    lr: float = 0.1,
    call: Callable = lambda m, x: m(x),
    rtol: float = TOL64["rtol"],
    atol: float = TOL64["atol"],
    eval_steps: int = 1,
    copy_state: bool = True,
    common_only: bool = False,
) -> None:
    """Train two modules side by side with SGD (momentum 0.9) and compare, at every step, the
    outputs, the input gradients, every parameter gradient, then every parameter and buffer
    after the optimizer step; then switch both to eval and compare outputs and gradients again.

    ``theirs`` first receives ``ours``'s state dict (so parameters start equal, and the load is
    exercised) unless ``copy_state`` is False. ``make_input(step)`` returns a float64 tensor.
    ``common_only`` compares only the parameters and state entries both modules have (for
    equivalences between different layers, e.g. a one-hot switchable norm and batch norm).
    """
    if copy_state:
        theirs.load_state_dict(ours.state_dict())
    pa, pb = dict(ours.named_parameters()), dict(theirs.named_parameters())
    if common_only:
        assert pa.keys() & pb.keys() == pb.keys(), f"{sorted(pb)} not all in {sorted(pa)}"
    else:
        assert pa.keys() == pb.keys(), f"parameters differ: {sorted(pa)} vs {sorted(pb)}"
    opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9) for m in (ours, theirs)] if pa else []

    def one(step, tag):
        x = make_input(step)
        dy = None
        xs = [x.detach().clone().requires_grad_(True) for _ in range(2)]
        ys = [call(m, xi) for m, xi in zip((ours, theirs), xs, strict=True)]
        assert_close(ys[0], ys[1], rtol, atol, f"{tag} step {step}: output")
        gen = torch.Generator().manual_seed(1000 + step)
        dy = torch.randn(ys[0].shape, generator=gen, dtype=ys[0].dtype)
        for o in opts:
            o.zero_grad()
        for y in ys:
            (y * dy).sum().backward()
        assert_close(xs[0].grad, xs[1].grad, rtol, atol, f"{tag} step {step}: input grad")
        for name in pb:
            assert_close(pa[name].grad, pb[name].grad, rtol, atol, f"{tag} step {step}: grad of {name}")

    for step in range(steps):
        one(step, "train")
        for o in opts:
            o.step()
        assert_state_equal(ours, theirs, rtol, atol, f"after train step {step}", common_only)
    ours.eval()
    theirs.eval()
    for step in range(steps, steps + eval_steps):
        one(step, "eval")
        assert_state_equal(ours, theirs, rtol, atol, f"after eval step {step}", common_only)


def assert_state_equal(a: torch.nn.Module, b: torch.nn.Module, rtol=TOL64["rtol"], atol=TOL64["atol"], what="",
                       common_only: bool = False):
    """Same state_dict keys and values (integers such as num_batches_tracked exactly); with
    ``common_only`` only the keys both have."""
    sa, sb = a.state_dict(), b.state_dict()
    if not common_only:
        assert list(sa) == list(sb), f"{what}: state_dict keys {list(sa)} != {list(sb)}"
    for k in (k for k in sa if k in sb):
        if sa[k].is_floating_point():
            assert_close(sa[k], sb[k], rtol, atol, f"{what}: {k}")
        else:
            assert torch.equal(sa[k], sb[k]), f"{what}: {k} {sa[k]} != {sb[k]}"


def assert_state_dict_roundtrip(ours: torch.nn.Module, theirs: torch.nn.Module, perturb: bool = True) -> None:
    """Load torch -> normlab and normlab -> torch (strict) and check the values arrive.

    With ``perturb`` every floating entry of the source is first filled with distinct values,
    so a load that silently skipped an entry would show.
    """
    for src, dst in ((theirs, ours), (ours, theirs)):
        sd = src.state_dict()
        if perturb:
            g = torch.Generator().manual_seed(7)
            with torch.no_grad():
                for v in sd.values():
                    if v.is_floating_point():
                        v.copy_(torch.rand(v.shape, generator=g, dtype=v.dtype) + 0.5)
                    elif v.dtype == torch.long:
                        v.fill_(5)
        result = dst.load_state_dict(src.state_dict(), strict=True)
        assert not result.missing_keys and not result.unexpected_keys
        assert_state_equal(dst, src, 0, 0, f"{type(src).__module__} -> {type(dst).__module__}")


def named_grads(module: torch.nn.Module) -> dict:
    return {k: p.grad for k, p in module.named_parameters()}


def running_closed_form(batch_stats: Iterable[np.ndarray], init: np.ndarray, momentum: Optional[float]) -> np.ndarray:
    """Running estimate after the given per-step statistics: ``(1-m)^k r0 + sum_i m (1-m)^(k-1-i) s_i``,
    or the plain average of ``s_i`` (``init`` drops out) when ``momentum is None``."""
    stats = [np.asarray(s, np.float64) for s in batch_stats]
    k = len(stats)
    if momentum is None:
        return np.mean(stats, axis=0)
    m = momentum
    out = (1 - m) ** k * np.asarray(init, np.float64)
    for i, s in enumerate(stats):
        out = out + m * (1 - m) ** (k - 1 - i) * s
    return out


def run_against_reference(module: torch.nn.Module, ref_step: Callable, make_input: Callable[[int], np.ndarray],
                          steps: int = 3, lr: float = 0.1, call: Callable = lambda m, x, step: m(x),
                          rtol: float = TOL64["rtol"], atol: float = TOL64["atol"]):
    """Train a normlab layer for ``steps`` SGD steps, then one eval step, checking each step
    against the NumPy reference.

    ``ref_step(x, step, params, running, training, dy) -> (y, grads, running)`` runs the reference
    with the module's current parameters (``params``: name -> array) and returns the output, a
    dict of gradients (``"input"`` and parameter names) and the updated ``RunningStats`` (or
    None). Compared: outputs, input and parameter gradients, running_mean/var and
    num_batches_tracked after every step.
    """
    from normlab.reference import RunningStats

    tracked = getattr(module, "running_mean", None) is not None
    running = RunningStats(n(module.running_mean), n(module.running_var), 0) if tracked else None
    params_list = list(module.parameters())
    opt = torch.optim.SGD(params_list, lr=lr, momentum=0.9) if params_list else None
    for step in range(steps + 1):
        training = step < steps
        module.train(training)
        tag = f"{'train' if training else 'eval'} step {step}"
        x = make_input(step)
        dy = randn(x.shape, 500 + step)
        params = {k: n(p) for k, p in module.named_parameters()}
        y_ref, grads, running = ref_step(x, step, params, running, training, dy)
        xt = t(x, requires_grad=True)
        y = call(module, xt, step)
        if opt is not None:
            opt.zero_grad()
        y.backward(t(dy))
        assert_close(y, y_ref, rtol, atol, f"{tag}: output")
        assert_close(xt.grad, grads["input"], rtol, atol, f"{tag}: input grad")
        for k, p in module.named_parameters():
            assert_close(p.grad, grads[k], rtol, atol, f"{tag}: grad of {k}")
        if training and opt is not None:
            opt.step()
        if tracked:
            assert_close(module.running_mean, running.mean, rtol, atol, f"{tag}: running_mean")
            assert_close(module.running_var, running.var, rtol, atol, f"{tag}: running_var")
            assert int(module.num_batches_tracked) == running.num_batches_tracked, f"{tag}: num_batches_tracked"
    return running


def cli_runner():
    """typer's CliRunner with stderr apart from stdout (``mix_stderr=False`` before click 8.2,
    which always separates them and no longer takes the argument)."""
    from typer.testing import CliRunner

    try:
        return CliRunner(mix_stderr=False)
    except TypeError:
        return CliRunner()


def randomize_bn_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial running statistics and affine parameters, so folding has something to do."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "running_mean", None) is not None:
                c = m.running_mean.numel()
                m.running_mean.copy_(torch.rand(c, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.25)
            if getattr(m, "running_mean", None) is not None or isinstance(m, torch.nn.modules.batchnorm._NormBase):
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 1.5 + 0.25)
                    m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return model


def randomize_norms_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every norm layer's affine parameters and running statistics set to values of its own
    (7 batches tracked), so what a tool copies or leaves is visible."""
    from normlab.tools import norm_kind

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if norm_kind(m) is None:
                continue
            for name in ("weight", "bias"):
                p = getattr(m, name, None)
                if p is not None:
                    p.copy_(torch.rand(p.shape, generator=g) + 0.5)
            if getattr(m, "running_mean", None) is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
                m.num_batches_tracked.fill_(7)
    return model
