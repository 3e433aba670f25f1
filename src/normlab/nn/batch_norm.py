"""Batch normalization layers, drop-in for ``torch.nn.BatchNorm1d/2d/3d`` (same arguments,
defaults, ``extra_repr`` and state_dict keys)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from normlab import _backend, _checks
from normlab import functional as NF
from normlab.functional._core import acc_dtype
from normlab.nn._affine import register_affine, reset_affine


class _NormBase(nn.Module):
    """Parameters and running statistics shared by every per-channel normalization.

    ``weight`` (γ, ones) and ``bias`` (β, zeros, unless ``bias=False``) when ``affine``; buffers ``running_mean``
    (zeros), ``running_var`` (ones) and ``num_batches_tracked`` when ``track_running_stats``.
    """

    _version = 2
    _layout = "(N, C, *)"
    _ranks: tuple = ()

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True) -> None:
        super().__init__()
        _checks.check_eps(eps, type(self).__name__)
        _checks.check_momentum(momentum, type(self).__name__)
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        register_affine(self, num_features, affine, bias, **factory)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        reset_affine(self)

    def extra_repr(self) -> str:
        return ("{num_features}, eps={eps}, momentum={momentum}, affine={affine}, bias={use_bias}, "
                "track_running_stats={track_running_stats}".format(**self.__dict__, use_bias=self.bias is not None))

    def _check_input(self, input: torch.Tensor) -> None:
        name = type(self).__name__
        _checks.check_floating(input, name, "tensor")
        _checks.check_rank(input.shape, self._ranks, name, self._layout)
        _checks.check_channels(input.shape, self.num_features, name)

    def _counts_steps(self) -> bool:
        return self.training and self.track_running_stats and self.num_batches_tracked is not None

    def _step(self, compute):
        """``compute(momentum, running_mean, running_var)``: this forward's output, computed with
        those running buffers (None where the layer has none or does not use them) and
        ``momentum``, the weight of this step's statistics in them.

        In training with running statistics the step is counted first, as torch counts it (so a
        non-reentrant checkpoint whose recompute stops right after the norm counts it again, as
        it moves the statistics again), and uncounted if the input is refused (ValueError or
        TypeError, raised before anything moves, where torch's count would move).
        ``momentum=None`` (the cumulative average) takes ``1 / num_batches_tracked``, as torch.

        Under ``torch.compile`` that Python number would change every step (a recompile each
        time): there the step runs with momentum 1 on copies of the buffers, which then hold
        this batch's statistics, and those are weighed against the buffers with the factor as
        a tensor, in float32 (float64 buffers: float64) and rounded once. (Copies: torch's batch
        norm keeps the buffers it was given for its backward, so they must not change in place
        after it.)
        """
        running_mean, running_var = self._running()
        if not self._counts_steps():
            return compute(0.0 if self.momentum is None else self.momentum, running_mean, running_var)
        self.num_batches_tracked.add_(1)
        cumulative = self.momentum is None and running_mean is not None and running_var is not None
        batch = None
        try:
            if not (cumulative and _backend._compiling()):
                momentum = self.momentum if self.momentum is not None else (
                    1.0 / float(self.num_batches_tracked) if cumulative else 0.0)
                return compute(momentum, running_mean, running_var)
            batch = running_mean.clone(), running_var.clone()
            return compute(1.0, *batch)
        except (ValueError, TypeError):
            self.num_batches_tracked.sub_(1)
            batch = None
            raise
        finally:
            # also when the forward is stopped after its statistics moved (a checkpoint's recompute
            # stops with an exception once the last saved tensor is packed: torch's own update
            # happened by then); copies that never moved blend back to the old values
            if batch is not None:
                with torch.no_grad():  # torch's rule with f = 1 / num_batches_tracked: f * new + (1 - f) * old
                    for buf, new in zip((running_mean, running_var), batch):
                        acc = acc_dtype(buf.dtype)
                        f = 1.0 / self.num_batches_tracked.to(acc)
                        buf.copy_(buf.to(acc) * (1.0 - f) + new.to(acc) * f)

    def _running(self):
        """The running buffers to pass on: used in eval, updated in training when tracked."""
        if not self.training or self.track_running_stats:
            return self.running_mean, self.running_var
        return None, None

    def _use_batch_stats(self) -> bool:
        return self.training or (self.running_mean is None and self.running_var is None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # checkpoints written before num_batches_tracked existed (torch's version < 2) lack it:
        # keep the current count, as torch does
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            current = self.num_batches_tracked
            keep = current is not None and current.device.type != "meta"
            state_dict[key] = current if keep else torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class _BatchNorm(_NormBase):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input(input)
        return self._step(lambda momentum, running_mean, running_var: NF.batch_norm(
            input, running_mean, running_var, self.weight, self.bias, self._use_batch_stats(), momentum, self.eps))


_BN_DOC = r"""Batch normalization over a {rank} input {layout} (Ioffe & Szegedy 2015).

    .. math:: y = \frac{{x - \mathrm{{E}}[x]}}{{\sqrt{{\mathrm{{Var}}[x] + \epsilon}}}} \gamma + \beta

    per channel, over the batch{spatial}. Training uses the batch's biased variance and moves
    the running estimates (unbiased variance, ``momentum`` = weight of the new value,
    ``None`` = cumulative average); evaluation uses the running estimates.

    Args:
        num_features: C, the number of channels.
        eps: added to the variance. Default 1e-5.
        momentum: weight of the new batch statistics in the running estimates. Default 0.1.
        affine: learn γ (ones) and β (zeros). Default True.
        bias: (keyword-only) learn β too when ``affine``, as torch >= 2.13. Default True.
        track_running_stats: keep running estimates; if False batch statistics are used in
            evaluation too. Default True.

    Shape:
        Input and output: {layout}.

    Examples::

        >>> bn = normlab.nn.{name}(16)
        >>> y = bn(torch.randn({example}))
    """


class BatchNorm1d(_BatchNorm):
    _ranks, _layout = (2, 3), "(N, C) or (N, C, L)"
    __doc__ = _BN_DOC.format(rank="2-D or 3-D", layout="(N, C) or (N, C, L)", spatial=" and length",
                             name="BatchNorm1d", example="8, 16, 10")


class BatchNorm2d(_BatchNorm):
    _ranks, _layout = (4,), "(N, C, H, W)"
    __doc__ = _BN_DOC.format(rank="4-D", layout="(N, C, H, W)", spatial=" and spatial positions",
                             name="BatchNorm2d", example="8, 16, 5, 5")


class BatchNorm3d(_BatchNorm):
    _ranks, _layout = (5,), "(N, C, D, H, W)"
    __doc__ = _BN_DOC.format(rank="5-D", layout="(N, C, D, H, W)", spatial=" and spatial positions",
                             name="BatchNorm3d", example="8, 16, 3, 5, 5")
