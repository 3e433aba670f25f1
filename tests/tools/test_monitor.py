"""monitor: recorded statistics against the same quantities computed directly on the layer outputs."""
from __future__ import annotations

import copy
import json
import math
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.tools import load_records, monitor, plot_records
from normlab.tools.monitor import Monitor


def mlp():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.Sigmoid(), nn.Linear(6, 4), nn.Tanh(),
                      nn.Dropout(0.0), nn.Linear(4, 3))
    with torch.no_grad():
        m[0].bias[:3] = -100.0  # units 0-2 never fire: dead
        m[2].bias[:2] = 30.0    # sigmoid units 0-1 saturate at 1
    return m


def data(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)


def train(m, steps, mon=None):
    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    for step in range(steps):
        x, y = data(step)
        opt.zero_grad()
        F.cross_entropy(m(x), y).backward()
        opt.step()


def direct(m, step):
    """Each layer's output and d loss / d output at ``step``, computed here without hooks."""
    x, y = data(step)
    m.zero_grad(set_to_none=True)
    outs, h = [], x
    for layer in m:
        h = layer(h)
        h.retain_grad()
        outs.append(h)
    F.cross_entropy(h, y).backward()
    return outs


@pytest.mark.parametrize("exact_limit", [1 << 16, 0], ids=["numpy-copy", "device-sums"])
def test_records_match_direct_statistics_and_gradients(tmp_path, exact_limit):
    m, twin = mlp(), mlp()
    path = tmp_path / "m.jsonl"
    with monitor(m, every=3, path=str(path), sample=10_000, exact_limit=exact_limit) as mon:
        train(m, 7)
    assert sorted({r["step"] for r in mon.records}) == [0, 3, 6]
    assert {r["layer"] for r in mon.records} == {"0", "1", "2", "3", "4", "5", "7"}  # Dropout is skipped
    assert load_records(str(path)) == json.loads(json.dumps(mon.records))
    # replay the twin to step 3 and compare step 3's records with the layer outputs computed directly
    train(twin, 3)
    twin_params = {n: p.detach().clone() for n, p in twin.named_parameters()}
    outs = direct(twin, 3)
    rec = {r["layer"]: r for r in mon.records if r["step"] == 3}
    for i, out in enumerate(outs):
        if str(i) not in rec:
            continue
        r, y = rec[str(i)], out.detach().double()
        assert r["numel"] == y.numel() and r["type"] == type(twin[i]).__name__
        assert r["mean"] == pytest.approx(y.mean().item(), rel=1e-5, abs=1e-6)
        assert r["std"] == pytest.approx(y.std(unbiased=False).item(), rel=1e-5, abs=1e-6)
        assert (r["min"], r["max"]) == pytest.approx((y.min().item(), y.max().item()), rel=1e-6, abs=1e-6)
        if exact_limit:  # the sample is the whole output (sample > numel): percentiles are exact
            for p, v in r["percentiles"].items():
                assert v == pytest.approx(np.percentile(y.numpy(), float(p)), rel=1e-5, abs=1e-6)
            assert sum(r["hist"]["counts"]) == y.numel()
        else:  # a random sample of 10000 drawn from the output: within its range, in order
            qs = list(r["percentiles"].values())
            assert qs == sorted(qs) and r["min"] - 1e-6 <= qs[0] and qs[-1] <= r["max"] + 1e-6
            assert sum(r["hist"]["counts"]) == 10_000
        assert r["grad_norm"] == pytest.approx(out.grad.norm().item(), rel=1e-5)
        if isinstance(twin[i], nn.Linear):
            expected = torch.cat([twin[i].weight.grad.reshape(-1), twin[i].bias.grad]).norm().item()
            assert r["weight_grad_norm"] == pytest.approx(expected, rel=1e-5)
    relu, sig, tanh = outs[1].detach(), outs[3].detach(), outs[5].detach()
    assert rec["1"]["zero"] == pytest.approx((relu == 0).double().mean().item())
    assert rec["1"]["dead"] == pytest.approx(((relu > 0).sum(0) == 0).double().mean().item())
    assert rec["1"]["dead"] >= 3 / 8
    assert rec["3"]["saturated"] == pytest.approx(((sig < 0.01) | (sig > 0.99)).double().mean().item())
    assert rec["3"]["saturated"] >= 2 / 6
    assert rec["5"]["saturated"] == pytest.approx((tanh.abs() > 0.98).double().mean().item())
    assert "saturated" not in rec["0"] and "dead" not in rec["3"]
    assert all(torch.equal(p, twin_params[n]) for n, p in twin.named_parameters())  # direct() did not step


def test_hooks_are_gone_after_the_block_and_eval_is_not_counted():
    m = mlp()
    with monitor(m, every=2) as mon:
        train(m, 3)
        m.eval()
        with torch.no_grad():
            m(torch.randn(2, 5))
        m.train()
        train(m, 1)
    assert mon.step == 4 and sorted({r["step"] for r in mon.records}) == [0, 2]
    for mod in m.modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks
    assert not nn.modules.module._global_forward_hooks
    for p in m.parameters():
        assert not getattr(p, "_post_accumulate_grad_hooks", None)
    before = len(mon.records)
    train(m, 2)
    assert len(mon.records) == before


def test_inplace_relu_does_not_change_what_the_layer_before_it_recorded():
    torch.manual_seed(1)
    m = nn.Sequential(nn.Linear(4, 32), nn.ReLU(inplace=True))
    x = torch.randn(64, 4)
    expected = m[0](x).detach()
    with monitor(m, every=1, modules=["0"]) as mon:
        m(x).sum().backward()
    (r,) = mon.records
    assert r["min"] == pytest.approx(expected.min().item()) and r["min"] < 0
    assert r["mean"] == pytest.approx(expected.mean().item(), rel=1e-5)


def test_large_outputs_are_sampled_and_plot_draws_a_figure(tmp_path):
    torch.manual_seed(2)
    m = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    with monitor(m, every=1, sample=500, path=str(tmp_path / "c.jsonl")) as mon:
        for _ in range(3):
            m(torch.randn(8, 1, 16, 16)).mean().backward()
    r = mon.records[-1]
    assert r["numel"] == 8 * 4 * 256 and sum(r["hist"]["counts"]) == 500
    assert -0.25 < r["percentiles"]["50"] < 0.25 and r["layer"] == "2"  # BN output's median is about 0
    import matplotlib
    before = matplotlib.get_backend()
    matplotlib.use("svg")  # the caller's backend (a notebook's, say) must survive plotting
    try:
        out = mon.plot(str(tmp_path / "m.png"))
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
    assert (tmp_path / "m.png").stat().st_size > 10_000
    plot_records(str(tmp_path / "c.jsonl"), str(tmp_path / "c.png"), layers=["1"], title="one layer")
    assert out.endswith("m.png") and (tmp_path / "c.png").exists()
    with pytest.raises(ValueError, match=r"no records for layer\(s\) \['9'\]"):
        plot_records(mon.records, str(tmp_path / "x.png"), layers=["9"])


def test_plot_of_records_without_the_15_50_85th_percentiles_draws_without_a_warning(tmp_path):
    """With other percentiles there are no percentile lines: no legend is asked for (matplotlib
    warned "No artists with labels found to put in legend" on every plot)."""
    m = mlp()
    with monitor(m, every=1, percentiles=(5, 95)) as mon:
        for _ in range(2):
            m(torch.randn(8, 5)).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mon.plot(str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 0


def test_bad_arguments_are_clear_errors():
    m = mlp()
    with pytest.raises(ValueError, match="every must be a positive int"):
        monitor(m, every=0)
    with pytest.raises(ValueError, match=r"no module named \['fc9'\]"):
        monitor(m, modules=["fc9"])
    with pytest.raises(ValueError, match="no layer to watch"):
        monitor(m, modules=lambda name, mod: False)
    with pytest.raises(ValueError, match="no records to plot"):
        plot_records([], "x.png")


def test_a_copy_of_the_model_is_not_affected():
    m = mlp()
    other = copy.deepcopy(m)
    with monitor(m, every=1) as mon:
        other(torch.randn(3, 5))
    assert mon.records == []


def test_records_are_reduced_in_batches_but_never_stale(tmp_path):
    """Recorded steps are reduced (and written) flush_every at a time; reading .records reduces
    what is queued, the file catches up on exit, and the numbers do not depend on the batching."""
    m, twin = mlp(), mlp()
    path = tmp_path / "b.jsonl"
    with monitor(m, every=2, path=str(path), flush_every=3) as mon:
        train(m, 5)  # steps 0 and 2 complete, step 4 in progress
        assert load_records(str(path)) == []  # 2 completed steps < flush_every: not reduced yet
        assert sorted({r["step"] for r in mon.records}) == [0, 2]  # the property reduces them
        assert sorted({r["step"] for r in load_records(str(path))}) == [0, 2]
        train(m, 2)  # step 6 starts: step 4 completes (1 queued)
        assert sorted({r["step"] for r in mon.records}) == [0, 2, 4]
        train(m, 8)  # steps 6, 8, 10, 12 complete: 3 reduced on their own when step 11 started
        assert sorted({r["step"] for r in load_records(str(path))}) == [0, 2, 4, 6, 8, 10]
    assert sorted({r["step"] for r in mon.records}) == [0, 2, 4, 6, 8, 10, 12, 14]
    assert load_records(str(path)) == json.loads(json.dumps(mon.records))
    with monitor(twin, every=2, flush_every=1) as one_by_one:
        train(twin, 5)
        train(twin, 2)
        train(twin, 8)
    assert one_by_one.records == mon.records


def test_records_are_there_after_the_block_without_reading_them_inside(tmp_path):
    m = mlp()
    with monitor(m, every=1, flush_every=100) as mon:
        train(m, 3)
    assert [r["step"] for r in mon.records if r["layer"] == "0"] == [0, 1, 2]
    assert all("grad_norm" in r for r in mon.records)
    with pytest.raises(ValueError, match="flush_every must be a positive int"):
        monitor(m, flush_every=0)


def test_variable_shapes_do_not_accumulate_buffers():
    # sequences of a new length at every step: the copies of small outputs must not keep one
    # buffer per length ever seen
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.ReLU())
    with monitor(m, every=1, flush_every=2) as mon:
        for length in range(5, 45):
            m(torch.randn(4, 2, length)).sum().backward()
        # (conv, relu) x (the last batch's 2 lengths, 1 queued step, the step in progress);
        # one buffer per length ever seen would be 2 x 40
        assert len(mon._rows) <= 2 * 4
    assert [r["numel"] for r in mon.records if r["layer"] == "0"] == [4 * 3 * n for n in range(5, 45)]


def test_a_model_with_more_sizes_than_probes_keeps_its_positions_from_step_to_step(monkeypatch):
    monkeypatch.setattr(Monitor, "PROBES", 2)  # fewer than the model's 6 output sizes
    widths = [5, 6, 7, 8, 9, 10]
    m = nn.Sequential(*[nn.Linear(a, b) for a, b in zip([4] + widths, widths)])
    with monitor(m, every=1, sample=3, exact_limit=8) as mon:
        m(torch.randn(2, 4)).sum().backward()
        first = {k: v for k, v in mon._probe.items()}
        for _ in range(3):
            m(torch.randn(2, 4)).sum().backward()
        assert all(mon._probe[k] is v for k, v in first.items())  # the same random positions, not redrawn


@pytest.mark.parametrize("exact_limit", [8, 1 << 16])  # sampled on the device / in the NumPy reduction
def test_variable_shapes_do_not_accumulate_sample_positions(monkeypatch, exact_limit):
    monkeypatch.setattr(Monitor, "PROBES", 5)
    m = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.ReLU())
    with monitor(m, every=1, sample=4, exact_limit=exact_limit) as mon:
        for length in range(5, 45):
            m(torch.randn(4, 2, length)).sum().backward()
            assert len(mon._probe) <= 5
    records = [r for r in mon.records if r["layer"] == "0"]
    assert len(records) == 40 and all(sum(r["hist"]["counts"]) == 4 for r in records)  # each from a 4-value sample


# -- training patterns beyond one forward and one backward per step ------------------------------

@pytest.mark.parametrize("flush_every", [1, 3, 8])
def test_two_forwards_before_one_backward_keep_their_gradients(flush_every):
    # a GAN discriminator on real and fake data, the two views of a contrastive loss: the
    # recorded forward is followed by another forward before the backward pass
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    expected = []
    with monitor(m, every=2, flush_every=flush_every) as mon:
        for _ in range(6):
            a = m(torch.randn(8, 3))
            a.retain_grad()
            b = m(torch.randn(8, 3))
            m.zero_grad()
            (a - b).pow(2).sum().backward()
            expected.append((a.grad.norm().item(),
                             torch.cat([m[1].weight.grad.flatten(), m[1].bias.grad]).norm().item()))
    out = [r for r in mon.records if r["layer"] == "1"]
    assert [r["step"] for r in out] == [0, 2, 4, 6, 8, 10]
    for r, (g, w) in zip(out, expected):
        assert r["grad_norm"] == pytest.approx(g, rel=1e-5) and r["weight_grad_norm"] == pytest.approx(w, rel=1e-5)


@pytest.mark.parametrize("flush_every,read_inside", [(1, False), (16, True)])
def test_three_forwards_before_one_backward_keep_every_steps_gradients(flush_every, read_inside):
    """A triplet loss: three recorded forwards, then one backward. Wrong version (monitor.py
    ``_reduce`` held back only the last late step): a reduction while two steps waited (flush_every=1,
    or reading .records between forwards) reduced the older one at once, without its gradients."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 4))
    expected = []
    with monitor(m, every=1, flush_every=flush_every) as mon:
        for _ in range(4):
            outs = []
            for _ in range(3):
                outs.append(m(torch.randn(8, 6)))
                outs[-1].retain_grad()
                if read_inside:
                    mon.records
            m.zero_grad()
            F.triplet_margin_loss(*outs).backward()
            w = torch.cat([m[2].weight.grad.flatten(), m[2].bias.grad]).norm().item()
            expected += [(o.grad.norm().item(), w) for o in outs]
    out = [r for r in mon.records if r["layer"] == "2"]
    assert [r["step"] for r in out] == list(range(12))
    for r, (g, w) in zip(out, expected):
        assert r["grad_norm"] == pytest.approx(g, rel=1e-5) and r["weight_grad_norm"] == pytest.approx(w, rel=1e-5)


def test_steps_whose_loss_is_never_backpropagated_are_not_held_forever():
    """Training-mode forwards with no backward (a loss only logged) wait for a gradient that never
    comes: at most HOLD_MAX of them are held back, the rest reduced without gradients."""
    m = nn.Sequential(nn.Linear(3, 3))
    with monitor(m, every=1, flush_every=1) as mon:
        for _ in range(Monitor.HOLD_MAX + 10):
            m(torch.randn(2, 3))
        assert len(mon._captured) <= Monitor.HOLD_MAX
        assert len(mon.records) == 9  # the last forward is still in progress, HOLD_MAX of the rest held
    assert len(mon.records) == Monitor.HOLD_MAX + 10 and all("grad_norm" not in r for r in mon.records)


@pytest.mark.parametrize("exact_limit", [1 << 16, 0])
def test_std_of_finite_outputs_beyond_float32_squares_is_finite(exact_limit):
    """Exploding but finite float32 activations (~1e20): their squares overflow float32. Wrong
    version: std came out inf (with a RuntimeWarning from NumPy on the copied path)."""
    class Scale(nn.Module):
        def forward(self, x):
            return x * 1e20

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), Scale())
    x = torch.randn(32, 8)
    with monitor(m, every=1, exact_limit=exact_limit, modules=["1"]) as mon:
        y = m(x)
    r = mon.records[0]
    assert r["nonfinite"] == 0
    assert r["std"] == pytest.approx(y.double().std(unbiased=False).item(), rel=1e-4)
    assert r["mean"] == pytest.approx(y.double().mean().item(), rel=1e-4, abs=1e-4 * r["std"])


def test_autograd_grad_before_backward_is_not_the_loss_pass():
    # a gradient penalty or a PINN: torch.autograd.grad first, then loss.backward()
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
    x = torch.randn(16, 2, requires_grad=True)
    with monitor(m, every=1) as mon:
        u = m(x)
        (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
        ((du ** 2).mean() + (u ** 2).mean()).backward()
    r = next(r for r in mon.records if r["layer"] == "0")
    assert r["weight_grad_norm"] == pytest.approx(
        torch.cat([m[0].weight.grad.flatten(), m[0].bias.grad]).norm().item(), rel=1e-5)


@pytest.mark.parametrize("exact_limit", [1 << 16, 0])  # norms at the end of the pass / in the hook
def test_half_precision_gradient_norms_do_not_overflow(exact_limit):
    # under a loss scale of 2**16 a float16 gradient's norm passes float16's 65504
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 64)).half()
    with monitor(m, every=1, exact_limit=exact_limit) as mon:
        (m(torch.randn(32, 4).half()).float().sum() * 2000.0).backward()
    r = mon.records[0]
    assert r["grad_norm"] == pytest.approx(2000 * (32 * 64) ** 0.5, rel=1e-3)
    w = torch.cat([m[0].weight.grad.float().flatten(), m[0].bias.grad.float()]).norm().item()
    assert math.isfinite(r["weight_grad_norm"]) and r["weight_grad_norm"] == pytest.approx(w, rel=1e-3)


def test_sparse_gradients_and_leaf_outputs():
    class Query(nn.Module):  # returns its own parameter: the output is a leaf
        def __init__(self):
            super().__init__()
            self.q = nn.Parameter(torch.ones(4, 3))

        def forward(self):
            return self.q

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.query, self.lin = nn.Embedding(10, 3, sparse=True), Query(), nn.Linear(3, 2)

        def forward(self, idx):
            return self.lin(self.emb(idx)).sum() + self.query().sum()

    m = M()
    with monitor(m, every=2) as mon:
        for step in range(3):
            m.zero_grad()
            (m(torch.tensor([[1, 2], [3, 4]])) * (step + 1)).backward()
            if step == 0:
                emb, q = m.emb.weight.grad.coalesce().values().norm().item(), m.query.q.grad.norm().item()
    by = {r["layer"]: r for r in mon.records if r["step"] == 0}
    assert by["emb"]["weight_grad_norm"] == pytest.approx(emb, rel=1e-5)
    assert by["query"]["grad_norm"] == pytest.approx(q, rel=1e-6)  # not overwritten by steps 1, 2
    assert not m.query.q._backward_hooks  # the leaf's hook is gone


def test_only_the_models_own_training_forward_is_recorded():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.train_head, self.eval_head = nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(4, 2)

        def forward(self, x):
            h = self.body(x)
            return self.train_head(h) if self.training else self.eval_head(h)

    m = M()
    with monitor(m, every=10) as mon:
        m.train()
        m(torch.randn(8, 3)).sum().backward()
        m.eval()
        with torch.no_grad():
            m(torch.randn(100, 3))
            m.eval_head(torch.randn(5, 4))
    assert [(r["layer"], r["numel"]) for r in mon.records] == [("body", 32), ("train_head", 16)]


def test_inference_mode_steps_and_reuse(tmp_path):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    mon = monitor(m, every=1, path=str(tmp_path / "m.jsonl"))
    with mon:
        with torch.inference_mode():  # a quick check in training mode: step 0
            m(torch.randn(8, 3))
        m(torch.randn(8, 3)).sum().backward()  # writes the copy buffer made in inference mode
    with mon:  # a Monitor used again appends to its file
        m(torch.randn(8, 3)).sum().backward()
    steps = [r["step"] for r in mon.records]
    assert steps == [0, 0, 1, 1, 2, 2] and [r["step"] for r in load_records(str(tmp_path / "m.jsonl"))] == steps


def test_a_module_called_twice_is_recorded_at_its_first_call():
    # the documented rule for a shared module: the record (statistics and gradient norm) is the first call's
    torch.manual_seed(0)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.act = nn.Linear(3, 5), nn.Linear(5, 2), nn.Tanh()

        def forward(self, x):
            return self.act(self.b(self.act(self.a(x))))

    m = Twice()
    x = torch.randn(4, 3)
    first = torch.tanh(m.a(x)).detach().requires_grad_()
    (torch.tanh(m.b(first)) ** 2).sum().backward()  # the same loss, with the first call's output as a leaf
    with monitor(m, every=1, modules=["act"]) as mon:
        (m(x) ** 2).sum().backward()
    (r,) = mon.records
    assert r["numel"] == 4 * 5
    assert r["mean"] == pytest.approx(torch.tanh(m.a(x)).mean().item(), rel=1e-5)
    assert r["grad_norm"] == pytest.approx(first.grad.norm().item(), rel=1e-5)


# -- NaN and inf: counted, kept out of the percentiles and histograms, and out of other layers' records --

class _Poison(nn.Module):
    """Passes its input on, writing inf and NaN into two places (``poison=False``: passes it on as is)."""

    def __init__(self, poison: bool = True):
        super().__init__()
        self.poison = poison

    def forward(self, x):
        y = x.clone()
        if self.poison:
            with torch.no_grad():
                y[0, 0], y[1, 3] = float("inf"), float("nan")
        return y


def _poisoned_run(poison: bool, **kwargs) -> list:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 8), _Poison(poison), nn.ReLU(), nn.Linear(8, 2))
    outs = []
    m[3].register_forward_hook(lambda mod, args, out: outs.append(out.detach().clone()))
    with monitor(m, every=1, **kwargs) as mon:
        for step in range(2):
            m(torch.randn(16, 4, generator=torch.Generator().manual_seed(step))).nan_to_num().sum().backward()
    return mon.records, outs


ACTIVATION_FIELDS = ("numel", "nonfinite", "mean", "std", "min", "max", "percentiles", "hist")


@pytest.mark.parametrize("exact_limit, host", [(1 << 16, True), (0, True), (0, False)],
                         ids=["numpy-copy", "device-sums", "device-sums-counted-there"])
def test_nan_and_inf_are_counted_and_leave_other_layers_alone(tmp_path, monkeypatch, exact_limit, host):
    if not host:  # the count that a GPU takes on the device (no waiting for it), exercised on the CPU
        monkeypatch.setattr(sys.modules[Monitor.__module__], "_HOST", ())
    path = tmp_path / "m.jsonl"
    records, outs = _poisoned_run(True, path=str(path), sample=10_000, exact_limit=exact_limit)
    healthy, _ = _poisoned_run(False, sample=10_000, exact_limit=exact_limit)
    assert [(r["step"], r["layer"]) for r in records] == [(r["step"], r["layer"]) for r in healthy]
    for r, h in zip(records, healthy):
        if r["layer"] == "0":  # before the NaN: bitwise what a run without it records
            assert {k: r[k] for k in ACTIVATION_FIELDS} == {k: h[k] for k in ACTIVATION_FIELDS}
            assert r["nonfinite"] == 0
    nonfinite = {(r["step"], r["layer"]): r["nonfinite"] for r in records}
    for step, y in enumerate(outs):
        assert nonfinite[step, "1"] == nonfinite[step, "2"] == 2  # ReLU keeps inf and NaN
        assert nonfinite[step, "3"] == (~torch.isfinite(y)).sum().item() > 0
    for r in records:
        hist, qs = r["hist"], list(r["percentiles"].values())
        assert all(math.isfinite(v) for v in qs + [hist["lo"], hist["hi"]]), r
        if exact_limit:  # the sample is the whole output: its finite values, exactly
            assert sum(hist["counts"]) == r["numel"] - r["nonfinite"]
        else:
            assert 0 < sum(hist["counts"]) <= 10_000
    if exact_limit:
        for step, y in enumerate(outs):
            r = next(r for r in records if (r["step"], r["layer"]) == (step, "3"))
            finite = y[torch.isfinite(y)].double().numpy()
            assert (r["hist"]["lo"], r["hist"]["hi"]) == (finite.min(), finite.max())
            for p, v in r["percentiles"].items():
                assert v == pytest.approx(np.percentile(finite, float(p)), rel=1e-6, abs=1e-7)
    lines = load_records(str(path))  # NaN and Infinity in the scalars: Python's json reads them back
    assert [line["nonfinite"] for line in lines] == [r["nonfinite"] for r in records]
    assert math.isnan(next(line for line in lines if line["layer"] == "1")["mean"])


def test_percentiles_and_histograms_of_a_row_with_nan_do_not_touch_its_neighbours():
    from normlab.tools.monitor import _percentiles_and_histograms

    scratch = {}

    def work(name, shape, dtype):  # the Monitor's work arrays, without a Monitor
        return scratch.setdefault((name, shape, np.dtype(dtype)), np.empty(shape, dtype))

    rng = np.random.default_rng(0)
    clean = rng.standard_normal((6, 300)).astype(np.float32)
    dirty = clean.copy()
    dirty[1, :5] = [np.nan, np.inf, -np.inf, np.nan, np.inf]
    dirty[4] = np.nan  # nothing finite at all
    args = ((1, 15, 50, 85, 99), 20, work)
    q, h = _percentiles_and_histograms([([0, 1, 2, 3, 4, 5], dirty, None)], 6, *args)
    q_clean, h_clean = _percentiles_and_histograms([([0, 1, 2, 3, 4, 5], clean, None)], 6, *args)
    for j in (0, 2, 3, 5):
        assert (q[j], h[j]) == (q_clean[j], h_clean[j])
    alone_q, alone_h = _percentiles_and_histograms([([0], dirty[1:2, 5:], None)], 1, *args)
    assert (q[1], h[1]) == (alone_q[0], alone_h[0])
    assert sum(h[1]["counts"]) == 295
    assert q[4] == [None] * 5 and h[4] == {"lo": None, "hi": None, "counts": [0] * 20}


def test_a_layer_with_no_finite_value_still_plots(tmp_path):
    class AllNaN(nn.Module):
        def forward(self, x):
            return torch.full_like(x, float("nan"))

    m = nn.Sequential(nn.Linear(3, 4), AllNaN())
    with monitor(m, every=1) as mon:
        for _ in range(3):
            m(torch.randn(5, 3))
    r = [r for r in mon.records if r["layer"] == "1"]
    assert [x["nonfinite"] for x in r] == [20] * 3
    assert all(set(x["percentiles"].values()) == {None} and sum(x["hist"]["counts"]) == 0 for x in r)
    out = tmp_path / "nan.png"
    mon.plot(str(out))
    assert out.stat().st_size > 0


# -- smaller contracts: activation kinds, arguments, and where the reductions draw their lines ----

def test_relu6_outputs_get_zero_and_dead_fractions():
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU6())
    with torch.no_grad():
        m[0].bias[:2] = -100.0  # units 0-1 never fire
    with monitor(m, every=1, modules=["1"]) as mon:
        m(torch.randn(8, 3)).sum().backward()
    (r,) = mon.records
    assert r["dead"] == pytest.approx(0.5) and r["zero"] >= 0.5


def test_percentiles_0_and_100_are_the_extremes_and_any_order_is_recorded_sorted():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4))
    with monitor(m, every=1, percentiles=(100, 50, 0)) as mon:
        y = m(torch.randn(8, 3))
    (r,) = mon.records
    assert list(r["percentiles"]) == ["0", "50", "100"]  # sorted: plots take the first and last as the range
    assert (r["percentiles"]["0"], r["percentiles"]["100"]) == pytest.approx((r["min"], r["max"]))
    assert r["percentiles"]["50"] == pytest.approx(np.percentile(y.detach().numpy(), 50), rel=1e-6)


def test_an_output_of_exactly_exact_limit_values_is_copied_whole():
    m = nn.Sequential(nn.Linear(3, 8))
    with monitor(m, every=1, exact_limit=2 * 8) as mon:  # numel 16 == exact_limit: copied, all values counted
        m(torch.randn(2, 3))
    assert sum(mon.records[0]["hist"]["counts"]) == 16


def test_a_sparse_gradient_with_a_repeated_index_is_normed_after_summing_its_rows():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Embedding(10, 3, sparse=True))
    with monitor(m, every=1) as mon:
        m(torch.tensor([1, 1, 2])).sum().backward()  # uncoalesced: row 1 appears twice
    assert mon.records[0]["weight_grad_norm"] == pytest.approx(m[0].weight.grad.to_dense().norm().item(), rel=1e-6)


def test_a_layer_whose_parameters_are_frozen_still_gets_its_output_gradient_norm():
    # the backward pass writes no watched parameter's .grad: frozen parameters must not make it look
    # like a torch.autograd.grad pass, which is ignored
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    m[1].requires_grad_(False)
    with monitor(m, every=1, modules=["1"]) as mon:
        m(torch.randn(5, 3)).sum().backward()
    assert mon.records[0]["grad_norm"] == pytest.approx(10 ** 0.5, rel=1e-6)  # d sum / d y = 1 for 5 x 2 values


def test_steps_waiting_for_a_backward_are_held_only_up_to_flush_bytes():
    m = nn.Sequential(nn.Linear(3, 3))
    with monitor(m, every=1, flush_bytes=1) as mon:
        for _ in range(4):
            m(torch.randn(2, 3))  # never backpropagated
        # the step in progress is captured on the next read; of the queued ones only the last is held back
        assert [r["step"] for r in mon.records] == [0, 1]


def test_the_captured_copies_hold_no_autograd_graph():
    m = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    with monitor(m, every=1, flush_every=8) as mon:
        m(torch.randn(2, 3)).sum().backward()
        assert mon._rows and not any(rows.buf.requires_grad for rows in mon._rows.values())


def test_std_of_outputs_far_from_zero_has_no_cancellation_on_the_device_path():
    torch.manual_seed(0)

    class Offset(nn.Module):
        def forward(self, x):
            return x + 1e4

    m = nn.Sequential(nn.Linear(8, 64), Offset())
    with monitor(m, every=1, exact_limit=0, modules=["1"]) as mon:
        y = m(torch.randn(512, 8)).detach().double()
    assert mon.records[0]["std"] == pytest.approx(y.std(unbiased=False).item(), rel=1e-4)


@pytest.mark.parametrize("exact_limit", [1 << 16, 0])
def test_std_of_large_negative_outputs_beyond_float32_squares_is_finite(exact_limit):
    class Scale(nn.Module):
        def forward(self, x):
            return x.abs() * -1e20 - 1e20

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 8), Scale())
    with monitor(m, every=1, exact_limit=exact_limit, modules=["1"]) as mon:
        y = m(torch.randn(32, 8)).detach().double()
    assert mon.records[0]["std"] == pytest.approx(y.std(unbiased=False).item(), rel=1e-4)
