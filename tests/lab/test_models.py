"""Lab models: shapes for every norm, the normalized RNN cells against torch's, and padding invariance."""
from __future__ import annotations

import pytest
import torch

from normlab.lab import models
from normlab.nn import GroupNorm, LayerNorm

torch.manual_seed(0)


@pytest.mark.parametrize("norm", ["none", "batch", "layer", "group:4", "rms"])
def test_mlp(norm):
    m = models.MLP(12, 3, (8, 8), norm=norm, activation="sigmoid")
    assert m(torch.randn(5, 2, 6)).shape == (5, 3)
    assert isinstance(m.blocks[0][1], torch.nn.Identity) == (norm == "none")


@pytest.mark.parametrize("dim,shape", [(2, (1, 8, 8)), (1, (1, 40))])
@pytest.mark.parametrize("norm", ["none", "batch", "layer", "group:4", "instance", "batch_renorm"])
def test_cnn(dim, shape, norm):
    m = models.CNN(1, 10, dim=dim, channels=(8, 16), strides=(1, 2), norm=norm)
    assert m(torch.randn(4, *shape)).shape == (4, 10)
    if norm == "layer":
        assert isinstance(m.blocks[0][1], GroupNorm) and m.blocks[0][1].num_groups == 1  # LN over (C, *spatial)


def test_lstm_cell_without_norm_is_torchs_lstm_cell():
    cell = models.NormLSTMCell(5, 7, norm="none")
    ref = torch.nn.LSTMCell(5, 7)
    f, i, o, g = (slice(k * 7, (k + 1) * 7) for k in range(4))
    order = lambda w: torch.cat([w[i], w[f], w[g], w[o]])  # noqa: E731 - torch's gates are (i, f, g, o)
    with torch.no_grad():
        ref.weight_ih.copy_(order(cell.weight_ih.weight))
        ref.weight_hh.copy_(order(cell.weight_hh.weight))
        ref.bias_ih.copy_(order(cell.bias))
        ref.bias_hh.zero_()
    x, h, c = torch.randn(3, 5), torch.randn(3, 7), torch.randn(3, 7)
    out, (h1, c1) = cell(x, (h, c))
    h2, c2 = ref(x, (h, c))
    torch.testing.assert_close(h1, h2)
    torch.testing.assert_close(c1, c2)


def test_gru_cell_without_norm_is_torchs_gru_cell():
    cell = models.NormGRUCell(5, 7, norm="none")
    with torch.no_grad():
        cell.bias.normal_()
    ref = torch.nn.GRUCell(5, 7)
    with torch.no_grad():
        ref.weight_ih.copy_(cell.weight_ih.weight)
        ref.weight_hh.copy_(cell.weight_hh.weight)
        ref.bias_ih.copy_(cell.bias)
        ref.bias_hh.zero_()  # torch puts b_hn inside r * (...); ours is outside: equal when it is 0
    x, h = torch.randn(3, 5), torch.randn(3, 7)
    torch.testing.assert_close(cell(x, h)[0], ref(x, h))


def test_ln_lstm_uses_layer_norm_on_gates_and_cell():
    cell = models.NormLSTMCell(5, 7, norm="layer")
    assert all(isinstance(n, LayerNorm) for n in (cell.norm_ih, cell.norm_hh, cell.norm_c))
    assert cell.norm_ih.normalized_shape == (28,) and cell.norm_c.normalized_shape == (7,)


def _padded(n=4, length=9, features=3):
    x = torch.randn(n, length, features)
    lengths = torch.tensor([9, 5, 2, 7])[:n]
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return x * mask[..., None], mask, lengths


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("norm", ["layer", "none"])
def test_rnn_reads_each_sequence_up_to_its_length(cell, norm):
    m = models.RNNClassifier(3, 6, 4, cell=cell, norm=norm).eval()
    x, mask, lengths = _padded()
    out = m(x, mask)
    junk = x + torch.randn_like(x) * (~mask)[..., None]  # change only the padding
    torch.testing.assert_close(m(junk, mask), out)
    for k in range(len(x)):
        torch.testing.assert_close(m(x[k: k + 1, : lengths[k]]), out[k: k + 1])


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_rnn_refuses_masked_batch_norm_and_its_batch_norm_sees_finished_sequences(cell):
    """The cells normalize one step's (N, C): masked batch norm needs (N, C, L) and is refused
    when the model is built, with make_norm's error; plain batch norm pools each step over the
    whole batch, finished sequences included, as the models' docstring says."""
    with pytest.raises(ValueError, match="'masked_batch' is not available for dim=0"):
        models.RNNClassifier(3, 6, 4, cell=cell, norm="masked_batch")
    m = models.RNNClassifier(3, 6, 4, cell=cell, norm="batch").train()
    x, mask, _ = _padded()
    a = m(x, mask)
    b = m(x + 5.0 * (~mask)[..., None], mask)
    assert not torch.allclose(a[mask.all(1)], b[mask.all(1)])  # even the unpadded sequence moves


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("norm", ["layer", "rms", "masked_batch"])
def test_transformer_ignores_padding(norm_first, norm):
    m = models.TransformerClassifier(3, 4, d_model=16, nhead=2, num_layers=2, norm=norm, norm_first=norm_first,
                                     max_len=16).eval()
    x, mask, lengths = _padded()
    out = m(x, mask)
    assert out.shape == (4, 4)
    junk = x + torch.randn_like(x) * (~mask)[..., None]
    torch.testing.assert_close(m(junk, mask), out)
    if norm != "masked_batch":  # per-sample norms: a sequence alone gives the same answer
        torch.testing.assert_close(m(x[1:2, : lengths[1]]), out[1:2], atol=1e-5, rtol=1e-5)


def test_transformer_batch_norm_sees_padding():
    m = models.TransformerClassifier(3, 4, d_model=16, nhead=2, norm="batch").train()
    x, mask, _ = _padded()
    a = m(x, mask)
    b = m(x + 5.0 * (~mask)[..., None], mask)  # padding enters plain BN's batch statistics
    assert not torch.allclose(a, b)


def test_init_gaussian():
    m = models.init_gaussian_(models.MLP(100, 10, (200,)), 0.5)
    w = m.blocks[0][0].weight
    assert abs(w.std().item() - 0.5) < 0.02 and m.blocks[0][0].bias.abs().max() == 0
    m = models.init_gaussian_(models.MLP(400, 10, (200,)), 2.0, fan_in=True)
    assert abs(m.blocks[0][0].weight.std().item() - 0.1) < 0.005


@pytest.mark.parametrize("name,kwargs", [("sgd", {}), ("sgd", {"momentum": 0.9, "weight_decay": 1e-3}),
                                         ("adam", {}), ("adam", {"weight_decay": 1e-3})])
def test_lab_optimizers_match_torch_optim(name, kwargs):
    from normlab.lab import training

    torch.manual_seed(0)
    # no batch norm here: it leaves the bias before it with a zero gradient, where Adam's update is
    # rounding noise divided by rounding noise
    a = models.MLP(6, 3, (5,), norm="layer")
    b = models.MLP(6, 3, (5,), norm="layer")
    b.load_state_dict(a.state_dict())
    ours = training.make_optimizer(name, a.parameters(), 0.05, **kwargs)
    ref = (torch.optim.SGD if name == "sgd" else torch.optim.Adam)(b.parameters(), lr=0.05, **kwargs)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    for _ in range(4):
        for m, opt in ((a, ours), (b, ref)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)
