"""Small models for the lab; each takes its normalization by name through :func:`normlab.nn.make_norm`.

==========================================  ================================================
model                                       input
==========================================  ================================================
``MLP(in_features, num_classes, ...)``      (N, *) flattened to (N, in_features)
``CNN(in_channels, num_classes, dim=2)``    (N, C, H, W) for dim=2, (N, C, L) for dim=1
``RNNClassifier(input_size, ..., cell)``    (N, L, F) and an optional mask (N, L)
``TransformerClassifier(input_size, ...)``  (N, L, F) and an optional mask (N, L)
==========================================  ================================================

Masks follow :class:`normlab.nn.MaskedBatchNorm1d`: **True at valid positions**. Sequence
models read sequences padded at the end; the RNN returns the state at the last valid step,
the transformer the mean over valid positions.

Norm specs are those of :func:`normlab.nn.make_norm` (``"none"``, ``"batch"``, ``"layer"``,
``"group:4"``, ``"batch_renorm"``, ``"masked_batch"`` ...); during a data-parallel run
(``--nproc N``) ``"batch"`` builds :class:`normlab.nn.SyncBatchNorm`. In the transformer the
token-wise norms (``"layer"``, ``"rms"``, ``"none"``) act on each position's features; the
others see the sequence as (N, C, L), so ``"batch"`` pools its statistics over the batch and
time, padding included, and ``"masked_batch"`` over valid positions only. The RNN's cells
normalize one step's (N, C) vectors (``make_norm``'s ``dim=0``), so ``"batch"`` pools over the
batch at each step, finished (padded) sequences included, and ``"masked_batch"``, which needs
(N, C, L), is refused there with make_norm's error.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from normlab.lab.parallel import sync_spec
from normlab.nn import MaskedBatchNorm1d, make_norm

ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "selu": nn.SELU, "gelu": nn.GELU,
               "identity": nn.Identity}
TOKENWISE = ("layer", "rms", "none")


def make_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def apply_norm(norm: nn.Module, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``norm(x, mask)`` for a masked batch norm on (N, C, L), ``norm(x)`` for any other norm."""
    return norm(x, mask) if isinstance(norm, MaskedBatchNorm1d) else norm(x)


class MLP(nn.Module):
    """Fully connected classifier: ``blocks[i] = Sequential(Linear, norm, activation)``, then a linear head.

    ``blocks[i][1]`` is the norm (``nn.Identity`` for ``"none"``), so its output is the
    activation's input: hook it to watch a unit's input distribution (Ioffe & Szegedy, Fig. 1).

    Args:
        in_features: size of the flattened input. num_classes: outputs.
        hidden: widths of the hidden layers. norm: spec for :func:`make_norm` (dim=0).
        activation: ``relu``, ``sigmoid``, ``tanh``, ``selu``, ``gelu`` or ``identity``.
    """

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (100, 100, 100),
                 norm: str = "none", activation: str = "relu") -> None:
        super().__init__()
        widths = [in_features, *hidden]
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(a, b), make_norm(sync_spec(norm), b, dim=0), make_activation(activation))
            for a, b in zip(widths[:-1], widths[1:]))
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class CNN(nn.Module):
    """Small convolutional classifier: per stage Conv(k, stride) -> norm -> activation, then a linear
    head on the flattened features (when ``input_size`` is given) or on their global average.
    ``dim=2`` for images (N, C, H, W), ``dim=1`` for signals (N, C, L).

    Args:
        in_channels, num_classes: input channels and outputs.
        dim: 1 or 2 spatial dims. channels: output channels per stage. strides: per stage.
        kernel_size: odd, padded to keep the size (before the stride). norm: spec for
        :func:`make_norm` with this ``dim`` (``"group:G"`` needs G to divide every stage's channels).
        input_size: spatial size of the input (an int: H = W, or L). With it the head sees every
        position (it learns faster on small images); without it, global average pooling.
    """

    def __init__(self, in_channels: int, num_classes: int, dim: int = 2, channels: Sequence[int] = (16, 32, 32),
                 strides: Sequence[int] = (1, 2, 2), kernel_size: int = 3, norm: str = "none",
                 activation: str = "relu", input_size: Optional[int] = None) -> None:
        super().__init__()
        if dim not in (1, 2):
            raise ValueError(f"CNN dim must be 1 or 2, got {dim}")
        if len(strides) != len(channels):
            raise ValueError(f"one stride per stage: {len(channels)} channels but {len(strides)} strides")
        conv = nn.Conv1d if dim == 1 else nn.Conv2d
        widths = [in_channels, *channels]
        self.blocks = nn.ModuleList(
            nn.Sequential(conv(a, b, kernel_size, stride=s, padding=kernel_size // 2),
                          make_norm(sync_spec(norm), b, dim=dim), make_activation(activation))
            for a, b, s in zip(widths[:-1], widths[1:], strides))
        self.flatten = input_size is not None
        features = widths[-1]
        if self.flatten:
            size = input_size
            for s in strides:
                size = (size + 2 * (kernel_size // 2) - kernel_size) // s + 1
            features *= size ** dim
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head(x.flatten(1) if self.flatten else x.flatten(2).mean(-1))


class NormLSTMCell(nn.Module):
    r"""LSTM cell with normalization inside, as the LN-LSTM of Ba, Kiros & Hinton 2016 (eq. 20-22):

    .. math::

        (f, i, o, g) = N_1(W_h h_{t-1}) + N_2(W_x x_t) + b, \quad
        c_t = \sigma(f) \odot c_{t-1} + \sigma(i) \odot \tanh(g), \quad
        h_t = \sigma(o) \odot \tanh(N_3(c_t))

    Each N normalizes its whole vector (all four gates at once) with its own gain and bias.
    ``norm="none"`` is the plain LSTM. The forget-gate bias starts at 1.
    """

    def __init__(self, input_size: int, hidden_size: int, norm: str = "layer") -> None:
        super().__init__()
        h = hidden_size
        self.hidden_size = h
        self.weight_ih = nn.Linear(input_size, 4 * h, bias=False)
        self.weight_hh = nn.Linear(h, 4 * h, bias=False)
        self.bias = nn.Parameter(torch.zeros(4 * h))
        with torch.no_grad():
            self.bias[:h].fill_(1.0)
        self.norm_ih, self.norm_hh, self.norm_c = (make_norm(sync_spec(norm), n, dim=0) for n in (4 * h, 4 * h, h))

    def init_state(self, x: torch.Tensor):
        z = x.new_zeros(x.shape[0], self.hidden_size)
        return z, z

    def forward(self, x: torch.Tensor, state):
        h, c = state
        gates = self.norm_hh(self.weight_hh(h)) + self.norm_ih(self.weight_ih(x)) + self.bias
        f, i, o, g = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(self.norm_c(c))
        return h, (h, c)


class NormGRUCell(nn.Module):
    r"""GRU cell with normalization inside, in the manner of Ba et al.'s LN-LSTM:

    .. math::

        a = N_1(W_x x_t), \quad b = N_2(W_h h_{t-1}), \quad
        (r, z) = \sigma(a_{rz} + b_{rz} + c_{rz}), \quad
        n = \tanh(a_n + r \odot b_n + c_n), \quad h_t = (1 - z) \odot n + z \odot h_{t-1}

    ``N_1`` and ``N_2`` each normalize all three gate blocks at once. ``norm="none"`` is the plain GRU.
    """

    def __init__(self, input_size: int, hidden_size: int, norm: str = "layer") -> None:
        super().__init__()
        h = hidden_size
        self.hidden_size = h
        self.weight_ih = nn.Linear(input_size, 3 * h, bias=False)
        self.weight_hh = nn.Linear(h, 3 * h, bias=False)
        self.bias = nn.Parameter(torch.zeros(3 * h))
        self.norm_ih, self.norm_hh = (make_norm(sync_spec(norm), 3 * h, dim=0) for _ in range(2))

    def init_state(self, x: torch.Tensor):
        return x.new_zeros(x.shape[0], self.hidden_size)

    def forward(self, x: torch.Tensor, state):
        h = state
        a = self.norm_ih(self.weight_ih(x))
        b = self.norm_hh(self.weight_hh(h))
        hh = self.hidden_size
        rz = torch.sigmoid(a[:, : 2 * hh] + b[:, : 2 * hh] + self.bias[: 2 * hh])
        r, z = rz.chunk(2, dim=1)
        n = torch.tanh(a[:, 2 * hh:] + r * b[:, 2 * hh:] + self.bias[2 * hh:])
        h = (1 - z) * n + z * h
        return h, h


class RNNClassifier(nn.Module):
    """A one-layer GRU or LSTM (with a norm inside the cell) over (N, L, F), then a linear head
    on the hidden state at each sequence's last valid step (the state stops changing at padding).

    Args:
        input_size: F. hidden_size: H. num_classes: outputs. cell: ``"gru"`` or ``"lstm"``.
        norm: spec for the cell's norms (``"layer"`` is Ba et al.'s LN; ``"none"`` the plain cell),
            each applied to one step's (N, C) (``make_norm``'s ``dim=0``; no ``"masked_batch"``).
    """

    def __init__(self, input_size: int, hidden_size: int, num_classes: int, cell: str = "lstm",
                 norm: str = "layer") -> None:
        super().__init__()
        cells = {"lstm": NormLSTMCell, "gru": NormGRUCell}
        if cell not in cells:
            raise ValueError(f"unknown cell {cell!r}; known: {', '.join(cells)}")
        self.cell = cells[cell](input_size, hidden_size, norm)
        self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        state = self.cell.init_state(x)
        h = None
        for t in range(x.shape[1]):
            m = None if mask is None else mask[:, t]
            h_new, new = self.cell(x[:, t], state)
            if m is None:
                h, state = h_new, new
            else:  # keep the state of finished sequences
                keep = lambda a, b: torch.where(m[:, None], a, b)  # noqa: E731
                state = tuple(map(keep, new, state)) if isinstance(new, tuple) else keep(new, state)
                h = state[0] if isinstance(state, tuple) else state
        return self.head(h)


class SequenceNorm(nn.Module):
    """A norm from :func:`make_norm` applied to token features (N, L, C): token-wise specs
    (``layer``, ``rms``, ``none``) on the last dim, the others on the (N, C, L) view, with the
    mask for ``masked_batch``."""

    def __init__(self, spec: str, num_features: int) -> None:
        super().__init__()
        self.tokenwise = spec.split(":")[0].strip().lower() in TOKENWISE
        self.norm = make_norm(sync_spec(spec), num_features, dim=0 if self.tokenwise else 1)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.tokenwise:
            return self.norm(x)
        return apply_norm(self.norm, x.transpose(1, 2), mask).transpose(1, 2)


class EncoderBlock(nn.Module):
    """Transformer encoder block: pre-LN ``h + attn(N(h))``, ``h + ff(N(h))`` (Xiong et al. 2020)
    or post-LN ``N(h + attn(h))``, ``N(h + ff(h))`` (Vaswani et al. 2017)."""

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int, norm: str, norm_first: bool,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % nhead:
            raise ValueError(f"d_model={d_model} must be divisible by nhead={nhead}")
        self.nhead, self.norm_first, self.dropout = nhead, norm_first, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, dim_feedforward), nn.GELU(), nn.Linear(dim_feedforward, d_model))
        self.norm1, self.norm2 = SequenceNorm(norm, d_model), SequenceNorm(norm, d_model)

    def attention(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        n, length, d = x.shape
        q, k, v = self.qkv(x).view(n, length, 3, self.nhead, d // self.nhead).permute(2, 0, 3, 1, 4)
        attn_mask = None if mask is None else mask[:, None, None, :]  # True = may attend to that key
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.dropout if self.training else 0.0)
        return F.dropout(self.proj(out.transpose(1, 2).reshape(n, length, d)), self.dropout, self.training)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        ff = lambda h: F.dropout(self.ff(h), self.dropout, self.training)  # noqa: E731
        if self.norm_first:
            x = x + self.attention(self.norm1(x, mask), mask)
            return x + ff(self.norm2(x, mask))
        x = self.norm1(x + self.attention(x, mask), mask)
        return self.norm2(x + ff(x), mask)


class TransformerClassifier(nn.Module):
    """A tiny transformer encoder over (N, L, F): linear embedding plus learned positions,
    ``num_layers`` :class:`EncoderBlock`, a final norm when pre-LN, masked mean pooling, a linear head.

    Args:
        input_size: F. num_classes: outputs. d_model, nhead, num_layers, dim_feedforward: sizes.
        norm: spec for every norm (``"layer"``, ``"rms"``, ``"batch"``, ``"masked_batch"`` ...).
        norm_first: True for pre-LN, False for post-LN. max_len: longest sequence. dropout: rate.
    """

    def __init__(self, input_size: int, num_classes: int, d_model: int = 32, nhead: int = 4, num_layers: int = 2,
                 dim_feedforward: int = 64, norm: str = "layer", norm_first: bool = True, max_len: int = 64,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Linear(input_size, d_model)
        self.pos = nn.Parameter(torch.randn(max_len, d_model) / math.sqrt(d_model))
        self.layers = nn.ModuleList(EncoderBlock(d_model, nhead, dim_feedforward, norm, norm_first, dropout)
                                    for _ in range(num_layers))
        self.final_norm = SequenceNorm(norm if norm_first else "none", d_model)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.shape[1] > self.pos.shape[0]:
            raise ValueError(f"sequence length {x.shape[1]} exceeds max_len={self.pos.shape[0]}")
        h = self.embed(x) + self.pos[: x.shape[1]]
        for layer in self.layers:
            h = layer(h, mask)
        h = self.final_norm(h, mask)
        if mask is None:
            return self.head(h.mean(1))
        m = mask[:, :, None].to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1.0))


def init_gaussian_(model: nn.Module, std: float, fan_in: bool = False) -> nn.Module:
    """Every Linear/Conv weight ~ N(0, std^2) (cs231n's ``weight_scale``), or N(0, std^2 / fan_in)
    with ``fan_in=True``; biases = 0; norms keep theirs."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            nn.init.normal_(m.weight, 0.0, std / math.sqrt(m.weight[0].numel()) if fan_in else std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model
