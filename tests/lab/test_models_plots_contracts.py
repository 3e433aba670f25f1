"""Contracts of the lab's models, its plot helpers, the plots the report shows and how it shows
them, that the existing tests left open. Each was found by mutating the lab: the test fails on
the wrong version named in its docstring.

The models are checked against forward passes written here from their docstrings with
``torch.nn.functional`` (layer order, norm placement, residuals, masks, dropout); the plots by
reading back what was drawn on the matplotlib objects (nothing is compared with a stored image).
"""
from __future__ import annotations

import html.parser
import importlib
import importlib.util
import math
import statistics
import textwrap
from pathlib import Path

import matplotlib
import matplotlib.colors as mcolors
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from normlab.lab import experiments, models, plotting, report, runner

ACT = {"relu": F.relu, "sigmoid": torch.sigmoid, "tanh": torch.tanh, "selu": F.selu, "gelu": F.gelu,
       "identity": lambda t: t}
EPS = 1e-5  # the default eps of normlab's norms


def _randomize_norms(model, seed=1):
    """Gains and biases of every norm layer away from 1 and 0, each its own, so that a norm used in
    the wrong place, or not at all, shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if type(mod).__module__.startswith("normlab.nn") and isinstance(getattr(mod, "weight", None), torch.Tensor):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * 0.5 + 1.0)
                mod.bias.copy_(torch.randn(mod.bias.shape, generator=g) * 0.5)


def _ln(t, norm_module):
    """Layer norm over the last dim with the gain and bias of ``norm_module`` (a normlab LayerNorm)."""
    return F.layer_norm(t, (t.shape[-1],), norm_module.weight, norm_module.bias, EPS)


# -- models.py: MLP and CNN -------------------------------------------------------------------------

@pytest.mark.parametrize("activation", sorted(ACT))
def test_mlp_is_linear_norm_activation_per_hidden_layer_then_a_linear_head(activation):
    """Pins MLP's documented layer order ``blocks[i] = Sequential(Linear, norm, activation)`` for
    every hidden width, with the activation named, then the linear head, against a forward pass
    written here (layer-norm gains set apart from 1, so a norm in the wrong place shows).
    Wrong version: models.py MLP ``Sequential(Linear, make_norm(...), make_activation(activation))`` ->
    ``Sequential(Linear, make_activation(activation), make_norm(...))``; ``make_activation(activation)`` ->
    ``make_activation("relu")`` (bn-mnist's sigmoid nets were ReLU nets); ``for block in self.blocks`` ->
    ``self.blocks[:-1]``; ``"selu": nn.SELU`` -> ``nn.ELU``."""
    torch.manual_seed(0)
    m = models.MLP(10, 3, (7, 5), norm="layer", activation=activation)
    _randomize_norms(m)
    x = torch.randn(6, 2, 5)
    h = x.flatten(1)
    for block, width in zip(m.blocks, (7, 5)):
        lin, norm = block[0], block[1]
        assert lin.out_features == width
        h = ACT[activation](F.layer_norm(F.linear(h, lin.weight, lin.bias), (width,), norm.weight, norm.bias, EPS))
    want = F.linear(h, m.head.weight, m.head.bias)
    assert len(m.blocks) == 2
    torch.testing.assert_close(m(x), want)


@pytest.mark.parametrize("dim,kernel,input_size", [(2, 5, None), (2, 3, 7), (1, 5, 9), (1, 3, None)])
def test_cnn_is_conv_norm_activation_per_stage_with_same_padding_then_a_linear_head(dim, kernel, input_size):
    """Pins CNN's documented stage ``Conv(k, stride, padded to keep the size) -> norm -> activation``
    and its head (on the flattened features with ``input_size``, else on their global average),
    against a forward pass written here, with kernel 5 and odd input sizes (7 -> 7 -> 4: the
    ceiling of size / stride).
    Wrong version: models.py CNN ``Conv, norm, activation`` -> ``Conv, activation, norm``;
    ``x.flatten(2).mean(-1)`` -> ``x.flatten(2).amax(-1)``; ``(size + 2 * (kernel_size // 2) - kernel_size) // s + 1``
    -> ``size // s``; ``padding=kernel_size // 2`` -> ``padding=1``."""
    torch.manual_seed(0)
    m = models.CNN(2, 4, dim=dim, channels=(4, 6), strides=(1, 2), kernel_size=kernel, norm="batch",
                   activation="tanh", input_size=input_size).train()
    _randomize_norms(m)
    size = input_size or 6
    x = torch.randn(5, 2, *(size,) * dim)
    conv = F.conv2d if dim == 2 else F.conv1d
    h = x
    for block, stride in zip(m.blocks, (1, 2)):
        h = conv(h, block[0].weight, block[0].bias, stride=stride, padding=kernel // 2)
        h = torch.tanh(F.batch_norm(h, None, None, block[1].weight, block[1].bias, training=True, eps=EPS))
    assert h.shape[2:] == (math.ceil(size / 2),) * dim
    feats = h.flatten(1) if input_size else h.flatten(2).mean(-1)
    torch.testing.assert_close(m(x), F.linear(feats, m.head.weight, m.head.bias))


# -- models.py: the normalized RNN cells --------------------------------------------------------------

def test_lstm_forget_gate_bias_starts_at_one():
    """Pins 'The forget-gate bias starts at 1' with the documented gate order (f, i, o, g): with
    zero weights and state (h, c) = (0, 1) the new cell is sigmoid(1) * 1 + sigmoid(0) * tanh(0).
    (The comparison with torch's LSTMCell copies our bias into it, so it cannot see where the 1 is.)
    Wrong version: models.py NormLSTMCell ``self.bias[:h].fill_(1.0)`` -> ``self.bias[h:2 * h].fill_(1.0)``."""
    cell = models.NormLSTMCell(3, 4, norm="none")
    with torch.no_grad():
        cell.weight_ih.weight.zero_()
        cell.weight_hh.weight.zero_()
    x, h, c = torch.randn(2, 3), torch.zeros(2, 4), torch.ones(2, 4)
    _, (h1, c1) = cell(x, (h, c))
    s1 = 1.0 / (1.0 + math.exp(-1.0))
    torch.testing.assert_close(c1, torch.full((2, 4), s1))
    torch.testing.assert_close(h1, torch.full((2, 4), 0.5 * math.tanh(s1)))


def test_ln_lstm_cell_follows_ba_et_al_equations_with_each_norm_in_its_place():
    """Pins NormLSTMCell's equations (Ba et al. 2016, eq. 20-22) with norm="layer": gates =
    N_1(W_h h) + N_2(W_x x) + b, c' = sigma(f) c + sigma(i) tanh(g), h' = sigma(o) tanh(N_3(c')),
    each N with its own gain and bias (set apart here, so two swapped norms show). The existing
    test only checks that the three norms exist.
    Wrong version: models.py NormLSTMCell ``torch.tanh(self.norm_c(c))`` ->
    ``torch.tanh(c)``; ``self.norm_hh(self.weight_hh(h))`` -> ``self.weight_hh(h)``;
    ``norm_hh``/``norm_ih`` swapped; ``torch.tanh(g)`` -> ``torch.sigmoid(g)``."""
    torch.manual_seed(0)
    cell = models.NormLSTMCell(3, 4, norm="layer")
    _randomize_norms(cell)
    with torch.no_grad():
        cell.bias.normal_()
    x, h, c = torch.randn(5, 3), torch.randn(5, 4), torch.randn(5, 4)
    gates = (_ln(F.linear(h, cell.weight_hh.weight), cell.norm_hh)
             + _ln(F.linear(x, cell.weight_ih.weight), cell.norm_ih) + cell.bias)
    f, i, o, g = gates.chunk(4, dim=1)
    c_want = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_want = torch.sigmoid(o) * torch.tanh(_ln(c_want, cell.norm_c))
    out, (h1, c1) = cell(x, (h, c))
    torch.testing.assert_close(c1, c_want)
    torch.testing.assert_close(h1, h_want)
    torch.testing.assert_close(out, h_want)


def test_ln_gru_cell_follows_its_equations_with_each_norm_in_its_place():
    """Pins NormGRUCell's equations with norm="layer": a = N_1(W_x x), b = N_2(W_h h),
    (r, z) = sigma(a_rz + b_rz + c_rz), n = tanh(a_n + r * b_n + c_n), h' = (1 - z) n + z h.
    Wrong version: models.py NormGRUCell ``a = self.norm_ih(self.weight_ih(x))`` ->
    ``a = self.weight_ih(x)``."""
    torch.manual_seed(0)
    cell = models.NormGRUCell(3, 4, norm="layer")
    _randomize_norms(cell)
    with torch.no_grad():
        cell.bias.normal_()
    x, h = torch.randn(5, 3), torch.randn(5, 4)
    a = _ln(F.linear(x, cell.weight_ih.weight), cell.norm_ih)
    b = _ln(F.linear(h, cell.weight_hh.weight), cell.norm_hh)
    r, z = torch.sigmoid(a[:, :8] + b[:, :8] + cell.bias[:8]).chunk(2, dim=1)
    n = torch.tanh(a[:, 8:] + r * b[:, 8:] + cell.bias[8:])
    torch.testing.assert_close(cell(x, h)[0], (1 - z) * n + z * h)


def test_each_norm_of_the_normalized_cells_has_its_own_gain_and_bias():
    """Ba et al.'s N_1, N_2 (and the LSTM's N_3) are separate norms, each with its own gain and bias.
    The equation tests randomize every norm module's parameters, so one module shared by two places
    passed them. Wrong version: models.py NormGRUCell ``self.norm_ih, self.norm_hh = (make_norm(...)
    for _ in range(2))`` -> ``self.norm_ih = self.norm_hh = make_norm(...)``."""
    lstm, gru = models.NormLSTMCell(3, 4, norm="layer"), models.NormGRUCell(3, 4, norm="layer")
    for norms in ([lstm.norm_ih, lstm.norm_hh, lstm.norm_c], [gru.norm_ih, gru.norm_hh]):
        assert len({id(n) for n in norms}) == len(norms)
        assert len({id(p) for n in norms for p in n.parameters()}) == 2 * len(norms)


def test_rnn_classifier_builds_the_cell_it_is_asked_for():
    """Pins ``cell="lstm"`` -> NormLSTMCell and ``cell="gru"`` -> NormGRUCell (the rnn experiment
    labels its curves by these names; both cells pass the padding test, so nothing else told them apart).
    Wrong version: models.py ``{"lstm": NormLSTMCell, "gru": NormGRUCell}`` ->
    ``{"lstm": NormGRUCell, "gru": NormLSTMCell}``."""
    assert type(models.RNNClassifier(3, 4, 2, cell="lstm").cell) is models.NormLSTMCell
    assert type(models.RNNClassifier(3, 4, 2, cell="gru").cell) is models.NormGRUCell


# -- models.py: the transformer ---------------------------------------------------------------------

def _padded(n=4, length=9, features=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, length, features, generator=g)
    mask = torch.arange(length)[None, :] < torch.tensor([9, 5, 2, 7])[:n, None]
    return x * mask[..., None], mask


def _reference_block(block, x, mask):
    """EncoderBlock as its docstring says, written with plain tensor ops: multi-head attention over
    the valid keys (q, k, v in that order in qkv), then pre-LN ``h + attn(N1(h))``, ``h + ff(N2(h))``
    or post-LN ``N1(h + attn(h))``, ``N2(h + ff(h))``; no dropout."""
    n, length, d = x.shape
    heads = block.nhead

    def attn(t):
        q, k, v = F.linear(t, block.qkv.weight, block.qkv.bias).split(d, dim=-1)
        q, k, v = (u.reshape(n, length, heads, d // heads).transpose(1, 2) for u in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, length, d)
        return F.linear(out, block.proj.weight, block.proj.bias)

    def ff(t):
        return F.linear(F.gelu(F.linear(t, block.ff[0].weight, block.ff[0].bias)), block.ff[2].weight, block.ff[2].bias)

    n1, n2 = (lambda t: _ln(t, block.norm1.norm)), (lambda t: _ln(t, block.norm2.norm))
    if block.norm_first:
        x = x + attn(n1(x))
        return x + ff(n2(x))
    x = n1(x + attn(x))
    return n2(x + ff(x))


@pytest.mark.parametrize("norm_first", [True, False])
def test_transformer_matches_a_reference_pre_ln_or_post_ln_encoder_and_ignores_dropout_in_eval(norm_first):
    """Pins TransformerClassifier against a forward pass written here from the docstrings: linear
    embedding plus learned positions, pre-LN (Xiong et al.) or post-LN (Vaswani et al.) blocks with
    both residuals, attention to valid keys only, a final norm only when pre-LN, the mean over
    valid positions, a linear head; in eval mode a model built with dropout=0.5 computes exactly
    that, call after call. (The padding tests pass for pre- and post-LN alike: they could not tell
    the two apart.)
    Wrong version: models.py EncoderBlock ``if self.norm_first:`` -> ``if not self.norm_first:``;
    ``x = x + self.attention(...)`` -> ``x = self.attention(...)``; ``self.norm2(x + ff(x), mask)`` ->
    ``self.norm2(ff(x), mask)``; ``ff(self.norm2(x, mask))`` -> ``ff(self.norm1(x, mask))`` or ``ff(x)``;
    keys taken from the query projection; ``dropout_p=self.dropout if self.training else 0.0`` ->
    ``dropout_p=self.dropout``; ``F.dropout(self.proj(...), self.dropout, self.training)`` -> ``(..., True)``;
    TransformerClassifier ``SequenceNorm(norm if norm_first else "none", ...)`` -> ``SequenceNorm("none", ...)``;
    ``self.embed(x) + self.pos[: x.shape[1]]`` -> ``self.embed(x)``."""
    torch.manual_seed(0)
    m = models.TransformerClassifier(3, 4, d_model=16, nhead=2, num_layers=2, dim_feedforward=24, norm="layer",
                                     norm_first=norm_first, max_len=12, dropout=0.5).eval()
    _randomize_norms(m)
    x, mask = _padded()
    h = F.linear(x, m.embed.weight, m.embed.bias) + m.pos[: x.shape[1]]
    for block in m.layers:
        h = _reference_block(block, h, mask)
    if norm_first:
        h = _ln(h, m.final_norm.norm)
    w = mask[..., None].float()
    want = F.linear((h * w).sum(1) / w.sum(1), m.head.weight, m.head.bias)
    with torch.no_grad():
        torch.testing.assert_close(m(x, mask), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(m(x, mask), want, atol=1e-5, rtol=1e-5)  # no dropout draw in eval mode
    assert isinstance(m.final_norm.norm, torch.nn.Identity) != norm_first


def _block_in_training(neutral: str, p=0.5):
    """A pre-LN block in train mode whose attention (``neutral="attn"``) or feed-forward
    (``neutral="ff"``) path outputs exactly 0, so the other path alone is added to x."""
    torch.manual_seed(0)
    block = models.EncoderBlock(8, 2, 16, "layer", norm_first=True, dropout=p).train()
    with torch.no_grad():
        if neutral == "attn":
            block.proj.weight.zero_()
            block.proj.bias.zero_()
        else:
            block.ff[2].weight.zero_()
            block.ff[2].bias.zero_()
            block.qkv.weight.zero_()
            block.qkv.bias.zero_()  # v = 0: attention outputs 0 whatever its dropout, then proj gives its bias
            block.proj.bias.fill_(1.0)
    return block


def test_transformer_dropout_zeroes_and_rescales_the_feed_forward_and_attention_outputs_in_training():
    """Pins dropout in training on each residual branch: with the attention branch silenced, the
    block adds the feed-forward output with each entry either dropped (0) or scaled by 1 / (1 - p);
    with the feed-forward silenced and v = 0, the attention branch is the projection's bias,
    dropped or scaled. (Every lab experiment uses dropout=0, so no other test trains with it.)
    Wrong version: models.py EncoderBlock ``ff = lambda h: F.dropout(self.ff(h), self.dropout, self.training)`` ->
    ``ff = lambda h: self.ff(h)``; ``F.dropout(self.proj(...), self.dropout, self.training)`` -> ``self.proj(...)``."""
    x = torch.randn(3, 5, 8)
    block = _block_in_training("attn")
    ff_out = block.ff(_ln(x, block.norm2.norm)).detach()
    added = (block(x) - x).detach()
    dropped = added.abs() < 1e-7
    assert 0 < dropped.float().mean() < 1
    torch.testing.assert_close(added[~dropped], 2.0 * ff_out[~dropped])

    block = _block_in_training("ff")
    added = (block(x) - x).detach()
    dropped = added.abs() < 1e-7
    assert 0 < dropped.float().mean() < 1
    torch.testing.assert_close(added[~dropped], torch.full_like(added[~dropped], 2.0))


def test_transformer_masked_batch_norm_in_training_ignores_the_padding():
    """Pins that ``norm="masked_batch"`` takes its batch statistics over the valid positions in
    training too (the existing check runs in eval mode, on running statistics, where the mask
    changes nothing): changing only the padded inputs leaves every output as it was.
    Wrong version: models.py SequenceNorm ``apply_norm(self.norm, x.transpose(1, 2), mask)`` ->
    ``apply_norm(self.norm, x.transpose(1, 2), None)``."""
    torch.manual_seed(0)
    m = models.TransformerClassifier(3, 4, d_model=16, nhead=2, num_layers=2, norm="masked_batch", max_len=12).train()
    x, mask = _padded()
    junk = x + 3.0 * torch.randn_like(x) * (~mask)[..., None]
    torch.testing.assert_close(m(junk, mask), m(x, mask))


def test_transformer_positions_start_small_next_to_the_embedding():
    """Pins the learned positions' initial scale N(0, 1 / d_model): each position vector starts
    with norm ~1, the size of an embedded token, not sqrt(d_model) times it.
    Wrong version: models.py ``torch.randn(max_len, d_model) / math.sqrt(d_model)`` ->
    ``torch.randn(max_len, d_model)``."""
    torch.manual_seed(0)
    m = models.TransformerClassifier(3, 2, d_model=64, nhead=4, max_len=64)
    assert m.pos.std().item() == pytest.approx(1 / 8, rel=0.1)


# -- models.py: init_gaussian_ ----------------------------------------------------------------------

def test_init_gaussian_covers_convolutions_with_their_whole_fan_in_and_leaves_norms_alone():
    """Pins init_gaussian_ on a CNN (the existing test uses an MLP only): conv weights ~ N(0, std^2),
    or N(0, std^2 / fan_in) with fan_in = in_channels * kernel area; biases 0; the batch norms keep
    gain 1 and bias 0.
    Wrong version: models.py init_gaussian_ ``std / math.sqrt(m.weight[0].numel())`` ->
    ``std / math.sqrt(m.weight.shape[1])``; ``(nn.Linear, nn.Conv1d, nn.Conv2d)`` -> ``(nn.Linear,)``."""
    torch.manual_seed(0)
    cnn = models.CNN(3, 10, channels=(64, 64), strides=(1, 1), norm="batch")
    models.init_gaussian_(cnn, 2.0, fan_in=True)
    for block, fan_in in zip(cnn.blocks, (3 * 9, 64 * 9)):
        assert block[0].weight.std().item() == pytest.approx(2.0 / math.sqrt(fan_in), rel=0.06)
        assert block[0].bias.abs().max() == 0
        assert torch.equal(block[1].weight, torch.ones(64)) and torch.equal(block[1].bias, torch.zeros(64))
    models.init_gaussian_(cnn, 0.3)
    assert cnn.blocks[1][0].weight.std().item() == pytest.approx(0.3, rel=0.03)


# -- plotting.py ------------------------------------------------------------------------------------

def _fill_bounds(collection, xs):
    """(low, high) of a fill_between at each x, read from its polygon."""
    v = np.concatenate([p.vertices for p in collection.get_paths()])
    out = []
    for x in xs:
        ys = v[np.isclose(v[:, 0], x), 1]
        out.append((ys.min(), ys.max()))
    return np.array(out)


def test_band_draws_the_mean_over_seeds_and_one_sample_sd_at_the_first_xs():
    """Pins plotting.band: the line is the mean over the seeds present at each point (a shorter run
    is missing at its end, a None is missing), the shading mean ± the sample sd (n - 1, as the
    report states), drawn at the first len(series) x values, with the label and colour given and
    the shading in the line's colour. Expected values from ``statistics``, not numpy.
    Wrong version: plotting.py ``np.nanstd(y, axis=0, ddof=1)`` -> ``ddof=0``; ``np.nanmean`` ->
    ``np.nanmedian``; ``[: len(m)]`` -> ``[-len(m):]``; ``label=label`` dropped;
    ``out[i, : len(r)]`` -> ``out[i, n - len(r):]``; ``np.full(..., np.nan)`` -> ``np.zeros(...)``."""
    runs = [[0.0, 2.0, 3.0], [1.0, 6.0, 9.0], [5.0, None]]
    cols = [[r[i] for r in runs if i < len(r) and r[i] is not None] for i in range(3)]
    mean = [statistics.mean(c) for c in cols]
    sd = [statistics.stdev(c) if len(c) > 1 else 0.0 for c in cols]
    xs = [10.0, 20.0, 30.0, 40.0]
    _, ax = plotting.figure()
    plotting.band(ax, xs, runs, "BN", "#1f77b4", marker="o")
    (line,) = ax.lines
    np.testing.assert_allclose(line.get_xdata(), xs[:3])
    np.testing.assert_allclose(line.get_ydata(), mean)
    assert line.get_label() == "BN" and mcolors.same_color(line.get_color(), "#1f77b4")
    (fill,) = ax.collections
    np.testing.assert_allclose(_fill_bounds(fill, xs[:2]), [(m - s, m + s) for m, s in zip(mean[:2], sd[:2])])
    assert mcolors.same_color(fill.get_facecolor()[0][:3], mcolors.to_rgb("#1f77b4"))


def test_band_without_a_colour_shades_in_its_lines_colour():
    """Pins that a band given no colour shades in the colour its line took from the cycle, even
    after another line on the same axes (lines and fills have separate colour cycles).
    Wrong version: plotting.py ``fill_between(..., color=line.get_color(), ...)`` -> ``color=col``."""
    _, ax = plotting.figure()
    ax.plot([0, 1], [0, 1])  # a reference line first: the band's line is the cycle's second colour
    plotting.band(ax, [0, 1], [[1.0, 2.0], [2.0, 3.0]], "x")
    line, fill = ax.lines[1], ax.collections[0]
    assert mcolors.same_color(fill.get_facecolor()[0][:3], mcolors.to_rgb(line.get_color()))


@pytest.mark.parametrize("invert", [False, True])
def test_log_x_is_a_log_axis_labelled_exactly_at_the_ticks(invert):
    """Pins plotting.log_x: a log x scale, major ticks at the given values labelled with ``:g``
    ("1e-05", "0.5", "1", "30"), inverted only when asked.
    Wrong version: plotting.py log_x ``ax.set_xscale("log")`` -> (removed); ``if invert: ax.invert_xaxis()``
    -> (removed); ``f"{t:g}"`` -> ``f"{t}"``."""
    ticks = [1e-5, 0.5, 1.0, 30.0]
    _, ax = plotting.figure()
    ax.plot(ticks, [0, 1, 2, 3])
    plotting.log_x(ax, ticks, invert=invert)
    assert ax.get_xscale() == "log"
    np.testing.assert_allclose(ax.get_xticks(), ticks)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1e-05", "0.5", "1", "30"]
    assert ax.xaxis_inverted() == invert


def test_color_of_a_spec_with_an_argument_is_its_kinds_colour():
    """Pins ``color("group:4") == color("group")`` (the docstring's example), so a norm keeps its
    colour across experiments whatever its argument.
    Wrong version: plotting.py ``COLORS.get(str(name).split(":")[0])`` -> ``COLORS.get(str(name))``."""
    assert plotting.color("group:4") == plotting.color("group") is not None
    assert plotting.color("batch") != plotting.color("layer")


# -- report.py: what the plot functions get, and how the figures are shown --------------------------

def _run(out, name, seeds=2):
    runner.execute(runner.plan([name], "quick", seeds), out, jobs=1, show_progress=False)


class _Figures(html.parser.HTMLParser):
    """(img src, img alt, figcaption text) of each <figure> in the report's section ``section``."""

    def __init__(self, section):
        super().__init__()
        self.section, self.figures, self._in, self._cap = section, [], False, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self._in = a.get("id") == self.section
        elif self._in and tag == "img":
            self.figures.append([a.get("src"), a.get("alt"), ""])
        elif self._in and tag == "figcaption":
            self._cap = ""

    def handle_endtag(self, tag):
        if tag == "figcaption" and self._cap is not None:
            self.figures[-1][2] = self._cap
            self._cap = None

    def handle_data(self, data):
        if self._cap is not None:
            self._cap += data


def test_each_figure_shows_its_file_with_its_own_caption_escaped(fake_experiment, out_dir, monkeypatch):
    """Pins the report's figures: for each (file, caption) the plot function returned, in order, an
    <img> of ``plots/<experiment>/<file>`` (which is on disk) whose alt text and <figcaption> are
    that caption, HTML-escaped (read back through an HTML parser they are the caption's text).
    Wrong version: report.py _section_html ``<figcaption>{e(caption)}</figcaption>`` ->
    ``<figcaption>{caption}</figcaption>`` or ``<figcaption>{e(fname)}</figcaption>``;
    ``src = f"plots/{s.name}/{fname}"`` -> ``f"plots/{fname}"``."""
    module = experiments.get(fake_experiment).module
    captions = {"a.png": "mean <b>± sd</b> & more", "b.png": "second 'plot' \"quoted\" <"}

    def plots(config, runs, summary, out):
        for name in captions:
            fig, ax = plotting.figure()
            ax.plot([0, 1])
            plotting.save(fig, out / name)
        return list(captions.items())
    monkeypatch.setattr(module, "plots", plots)
    _run(out_dir, fake_experiment)
    page = report.build(out_dir).read_text()
    parser = _Figures(fake_experiment)
    parser.feed(page)
    assert parser.figures == [[f"plots/{fake_experiment}/{f}", c, c] for f, c in captions.items()]
    assert all((out_dir / src).is_file() for src, _, _ in parser.figures)


def test_the_plot_function_gets_the_config_and_every_seeds_metrics_in_seed_order(fake_experiment, out_dir,
                                                                                 monkeypatch):
    """Pins what the report hands an experiment's ``plots``: the Config object (not the stored
    dict) and the metrics of every seed shown, in seed order, as mean ± sd curves need.
    Wrong version: report.py _plots ``plots(config, metrics, ...)`` -> ``plots(config, metrics[:1], ...)``
    (seed 0 only) or ``metrics[::-1]``; _section ``_plots(sec, config, ...)`` -> ``_plots(sec, sec.config, ...)``."""
    module = experiments.get(fake_experiment).module
    seen = []
    monkeypatch.setattr(module, "plots", lambda config, runs, summary, out: seen.append((config, runs)) or [])
    _run(out_dir, fake_experiment, seeds=3)
    report.build(out_dir)
    ((config, runs),) = seen
    assert config == module.Config()
    assert runs == [{"value": pytest.approx(seed + 0.1), "steps": 3} for seed in range(3)]


def test_a_plot_function_taking_seeds_gets_the_seed_numbers_of_its_runs(fake_experiment, out_dir, monkeypatch):
    """Pins the optional ``seeds`` keyword: with seed 0 failed, ``plots`` gets the metrics of seeds
    1 and 2 and ``seeds=[1, 2]``, so a one-seed plot of ``runs[0]`` can name seed 1 (a caption that
    said "seed 0" there was wrong); a ``plots`` without the keyword is called as before.
    Wrong version: report.py _plots ``{"seeds": [r.seed for r in sec.runs]}`` -> ``{"seeds": list(range(len(sec.runs)))}``;
    ``if _takes_seeds(draw) else {}`` -> ``if False else {}``."""
    module = experiments.get(fake_experiment).module
    seen = []
    monkeypatch.setattr(module, "plots", lambda config, runs, summary, out, seeds=None: seen.append((runs, seeds)) or [])
    runner.execute(runner.plan([fake_experiment], "quick", 3, sets=["fail_seed=0"]), out_dir, jobs=1,
                   show_progress=False)
    report.build(out_dir)
    ((runs, seeds),) = seen
    assert seeds == [1, 2]
    assert [r["value"] for r in runs] == [pytest.approx(1.1), pytest.approx(2.1)]


@pytest.mark.parametrize("name, plot", [("bn_mnist", "percentiles.png"), ("spectral_gan", "samples.png")])
def test_one_seed_captions_name_the_seed_drawn(name, plot, drawn, tmp_path):
    """Pins the captions of bn-mnist's percentile plot and spectral-gan's samples, which draw
    ``runs[0]`` alone: they name that run's seed, and say "the first seed" when not told it.
    Wrong version: experiments/bn_mnist.py (or spectral_gan.py) caption ``({one_seed(seeds)})`` -> ``(seed 0)``."""
    m = importlib.import_module(f"normlab.lab.experiments.{name}")
    if name == "bn_mnist":
        net = {"step": [0, 10], "test_acc": [0.1, 0.5], "pct_unit0": [[-1, 0, 1]] * 2}
        runs, cfg = [{"plain": net, "bn": net}], m.Config()
    else:
        cfg = m.Config(modes=6, samples=300)
        h = {"step": [0, 10], "good": [0.1, 0.5], "modes": [1, 4], "points": [[0.0, 0.0], [1.0, 1.0]],
             "good_final": 0.5, "modes_final": 4, "n_dis": 1}
        runs = [{st: {"plain": h, "sn": h} for st in cfg.settings}]
    captions = dict(m.plots(cfg, runs, {}, tmp_path, seeds=[4]))
    assert "(seed 4)" in captions[plot] and "seed 0" not in captions[plot]
    if name == "spectral_gan":  # (the caption said 500 points and 8 centres whatever the config)
        assert captions[plot].startswith("300 generated points") and "the 6 mode centres" in captions[plot]
    captions = dict(m.plots(cfg, runs, {}, tmp_path))
    assert "(the first seed)" in captions[plot]


def test_plots_redraw_when_a_normlab_module_the_experiment_uses_changes(fake_experiment, out_dir, saves,
                                                                        monkeypatch, tmp_path):
    """Pins the documented key input 'every normlab module it refers to at top level (imported
    modules, functions and classes)': an experiment module holding ``training.train`` and the
    ``models`` module redraws when either module's source changes, and only then.
    Wrong version: report.py _code_files ``if (m is not None and m is not module and ...`` ->
    ``if (False and m is not None and ...`` (no referred module added)."""
    from normlab.lab import training

    module = experiments.get(fake_experiment).module
    monkeypatch.setattr(module, "train", training.train, raising=False)
    monkeypatch.setattr(module, "models", models, raising=False)
    _run(out_dir, fake_experiment)
    report.build(out_dir)
    report.build(out_dir)
    assert len(saves) == 1
    for n, mod in enumerate((training, models)):
        copy = tmp_path / f"copy{n}.py"
        copy.write_text(Path(mod.__file__).read_text() + "\n# changed\n")
        monkeypatch.setattr(mod, "__file__", str(copy))
        report.build(out_dir)
        assert len(saves) == n + 2, mod.__name__


def test_plots_redraw_when_the_file_defining_plots_changes(fake_experiment, out_dir, saves, monkeypatch, tmp_path):
    """Pins the key input 'the file defining its plots': an experiment whose ``plots`` comes from
    another file (here the module itself has no file) redraws when that file changes.
    Wrong version: report.py _code_files ``(own, code and code.co_filename)`` -> ``(own,)``."""
    source = tmp_path / "fake_plots.py"
    source.write_text(textwrap.dedent("""
        from normlab.lab import plotting

        def plots(config, runs, summary, out_dir):
            fig, ax = plotting.figure()
            ax.plot([r["value"] for r in runs])
            plotting.save(fig, out_dir / "values.png")
            return [("values.png", "values")]
    """))
    spec = importlib.util.spec_from_file_location("normlab_test_fake_plots", source)
    helper = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helper)
    module = experiments.get(fake_experiment).module
    assert getattr(module, "__file__", None) is None
    monkeypatch.setattr(module, "plots", helper.plots)
    _run(out_dir, fake_experiment)
    report.build(out_dir)
    report.build(out_dir)
    assert len(saves) == 1
    source.write_text(source.read_text().replace('"values")', '"values per seed")'))
    report.build(out_dir)
    assert len(saves) == 2


def test_plots_redraw_after_a_matplotlib_or_numpy_upgrade(fake_experiment, out_dir, saves, monkeypatch):
    """Pins the key's 'versions of normlab, matplotlib, numpy and Python' (the existing test bumps
    normlab's only): a new matplotlib, whose rendering may differ, redraws; so does a new numpy.
    Wrong version: report.py _code_digest ``[normlab.__version__, matplotlib.__version__, numpy.__version__, ...]``
    -> ``[normlab.__version__, numpy.__version__, ...]``."""
    _run(out_dir, fake_experiment)
    report.build(out_dir)
    monkeypatch.setattr(matplotlib, "__version__", matplotlib.__version__ + ".post1")
    report.build(out_dir)
    assert len(saves) == 2
    monkeypatch.setattr(np, "__version__", np.__version__ + ".post1")
    report.build(out_dir)
    assert len(saves) == 3


def test_a_plot_replaced_by_other_bytes_of_the_same_size_is_redrawn(fake_experiment, out_dir, saves):
    """Pins 'every listed file is there with the recorded size and hash': a PNG overwritten with
    different content of the same size is redrawn, not reused (the existing test truncates it).
    Wrong version: report.py _cached_plots ``_file_digest(plot_dir / f) != [size, digest]`` ->
    ``_file_digest(plot_dir / f)[0] != size``."""
    _run(out_dir, fake_experiment)
    report.build(out_dir)
    png = out_dir / "plots" / fake_experiment / "values.png"
    data = png.read_bytes()
    png.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    report.build(out_dir)
    assert len(saves) == 2 and png.read_bytes() == data


# -- the experiments' plots: the data drawn is the data passed -------------------------------------

@pytest.fixture
def drawn(monkeypatch):
    """{file name: Figure} of every ``plotting.save`` call, nothing written."""
    figs = {}
    monkeypatch.setattr(plotting, "save", lambda fig, path: figs.__setitem__(path.name, fig))
    return figs


def _lines(ax):
    return {line.get_label(): (line.get_xdata(), line.get_ydata()) for line in ax.lines}


def test_activation_histograms_show_each_bins_share_averaged_over_seeds_on_zero_to_one(drawn, tmp_path):
    """Pins activations' histogram panels (row 0 plain, row 1 BN, a column per layer): bar b spans
    [b / bins, (b + 1) / bins], the histogram's range (0, 1), and its height is the bin's count
    averaged over the seeds, as a share of the layer's activations; the gradient panel has a log
    y axis and each curve is its own network's mean over seeds.
    Wrong version: experiments/activations.py plots ``np.mean([r[key]["hist"][i] for r in runs], axis=0)`` ->
    ``runs[0][key]["hist"][i]``; ``counts / counts.sum()`` -> ``counts``; ``np.linspace(0, 1, config.bins + 1)``
    -> ``np.linspace(0, 2, config.bins + 1)``; ``yscale="log"`` -> (removed)."""
    from normlab.lab.experiments import activations as m

    cfg = m.Config(layers=2, bins=4)
    runs = [{"plain": {"hist": [[1, 2, 3, 4], [8, 0, 0, 2]], "var": [0.1, 0.2], "grad_norm": [1e-4, 1e-1]},
             "bn": {"hist": [[0, 5, 5, 0], [1, 1, 1, 1]], "var": [0.05, 0.05], "grad_norm": [1e-2, 1e-1]}},
            {"plain": {"hist": [[3, 2, 1, 4], [6, 0, 0, 4]], "var": [0.3, 0.4], "grad_norm": [3e-4, 3e-1]},
             "bn": {"hist": [[2, 3, 3, 2], [0, 2, 2, 0]], "var": [0.05, 0.07], "grad_norm": [3e-2, 2e-1]}}]
    m.plots(cfg, runs, {}, tmp_path)
    axes = np.array(drawn["histograms.png"].axes).reshape(2, cfg.layers)
    for row, key in enumerate(("plain", "bn")):
        for i in range(cfg.layers):
            bars = axes[row][i].patches
            mean = [(runs[0][key]["hist"][i][b] + runs[1][key]["hist"][i][b]) / 2 for b in range(cfg.bins)]
            np.testing.assert_allclose([p.get_height() for p in bars], np.array(mean) / sum(mean))
            np.testing.assert_allclose([(p.get_x(), p.get_x() + p.get_width()) for p in bars],
                                       [(b / cfg.bins, (b + 1) / cfg.bins) for b in range(cfg.bins)])
    _, grads = drawn["variance_gradients.png"].axes
    assert grads.get_yscale() == "log"
    one = dict(m.plots(cfg, runs[:1], {}, tmp_path))  # one seed: no "mean ± sd over seeds" in a caption
    assert "(1 seed)" in one["variance_gradients.png"] and "over seeds" not in one["variance_gradients.png"]
    got = _lines(grads)
    for key, label in (("plain", "plain"), ("bn", "with BN")):
        np.testing.assert_allclose(got[label][1], np.mean([r[key]["grad_norm"] for r in runs], axis=0))


def test_bn_mnist_accuracy_curves_carry_their_own_labels(drawn, tmp_path):
    """Pins bn-mnist's accuracy plot: the curve labelled "with BN" is the BN net's mean test accuracy
    at the steps run, in the batch colour, and "without BN" the plain net's.
    Wrong version: experiments/bn_mnist.py plots ``(("plain", "without BN"), ("bn", "with BN"))`` ->
    ``(("plain", "with BN"), ("bn", "without BN"))``."""
    from normlab.lab.experiments import bn_mnist as m

    def net(acc):
        return {"step": [0, 10, 20], "test_acc": acc, "pct_unit0": [[-1, 0, 1]] * 3}
    runs = [{"plain": net([0.1, 0.3, 0.5]), "bn": net([0.1, 0.8, 0.9])},
            {"plain": net([0.1, 0.2, 0.4]), "bn": net([0.2, 0.7, 0.9])}]
    m.plots(m.Config(), runs, {}, tmp_path)
    ax = drawn["accuracy.png"].axes[0]
    got = _lines(ax)
    for key, label, col in (("plain", "without BN", "none"), ("bn", "with BN", "batch")):
        np.testing.assert_allclose(got[label][0], [0, 10, 20])
        np.testing.assert_allclose(got[label][1], np.mean([r[key]["test_acc"] for r in runs], axis=0))
        line = next(ln for ln in ax.lines if ln.get_label() == label)
        assert mcolors.same_color(line.get_color(), plotting.color(col))


def test_init_scale_curves_are_each_networks_accuracy_on_a_log_scale_axis(drawn, tmp_path):
    """Pins init-scale's plot: each labelled curve is its own network's mean accuracy per scale, on
    a log x axis at the scales.
    Wrong version: experiments/init_scale.py plots ``summary[f"acc_by_scale_{key}"]`` ->
    ``summary["acc_by_scale_bn"]``."""
    from normlab.lab.experiments import init_scale as m

    cfg = m.Config(scales=(1e-3, 1e-1, 1.0))
    summary = {"acc_by_scale_plain": [[0.1, 0.5, 0.8], [0.1, 0.3, 0.9]],
               "acc_by_scale_bn": [[0.9, 0.9, 0.9], [0.8, 0.9, 0.95]]}
    m.plots(cfg, [{}, {}], summary, tmp_path)
    ax = drawn["init_scale.png"].axes[0]
    got = _lines(ax)
    for key, label in (("plain", "without BN"), ("bn", "with BN")):
        np.testing.assert_allclose(got[label][0], cfg.scales)
        np.testing.assert_allclose(got[label][1], np.mean(summary[f"acc_by_scale_{key}"], axis=0))
    assert ax.get_xscale() == "log"


def test_batch_size_plots_each_norms_error_percent_with_batch_size_falling_to_the_right(drawn, tmp_path):
    """Pins batch-size's plots: each norm's curve is 100 x its mean error per batch size, on a log
    axis with the batch size falling to the right, as in the paper's figure drawn beside it.
    Wrong version: experiments/batch_size.py plots ``plotting.log_x(ax, config.batch_sizes, invert=True)`` ->
    ``plotting.log_x(ax, config.batch_sizes)``."""
    from normlab.lab.experiments import batch_size as m

    cfg = m.Config(norms=("batch", "group:4"), batch_sizes=(2, 8, 32))
    summary = {"error_by_batch_batch": [[0.5, 0.3, 0.2], [0.4, 0.3, 0.1]],
               "error_by_batch_group:4": [[0.25, 0.25, 0.2], [0.25, 0.2, 0.2]]}
    m.plots(cfg, [{}, {}], summary, tmp_path)
    ax = drawn["batch_size.png"].axes[0]
    got = _lines(ax)
    for n in cfg.norms:
        np.testing.assert_allclose(got[n][0], cfg.batch_sizes)
        np.testing.assert_allclose(got[n][1], 100 * np.mean(summary[f"error_by_batch_{n}"], axis=0))
    paper = drawn["paper.png"].axes[0]
    for a in (ax, paper):
        assert a.get_xscale() == "log" and a.xaxis_inverted()
