"""Batch renormalization layers (Ioffe 2017); torch has no twin. State dicts are batch norm's."""
from __future__ import annotations

from typing import Optional

import torch

from normlab import _backend, _checks
from normlab import functional as NF
from normlab.nn.batch_norm import _NormBase
from normlab.reference.batch_renorm import renorm_limits


class _BatchRenorm(_NormBase):
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 rmax: float = 3.0, dmax: float = 5.0, warmup_steps: int = 0, device=None, dtype=None, *,
                 bias: bool = True) -> None:
        _checks.check_renorm_limits(rmax, dmax, type(self).__name__, warmup_steps)
        super().__init__(num_features, eps, momentum, affine, True, device, dtype, bias=bias)
        self.rmax, self.dmax, self.warmup_steps = rmax, dmax, warmup_steps

    def limits(self) -> tuple:
        """``(rmax, dmax)`` in force for the next training step (the warm-up ramps them from (1, 0)).
        Without a warm-up the step count is not read (reading it breaks a ``torch.compile`` graph;
        compiled, exported or traced, the forward takes the ramp as tensors, :meth:`_traced_limits`)."""
        if self.warmup_steps <= 0:
            return float(self.rmax), float(self.dmax)
        if self.num_batches_tracked is None:  # buffers set to None after construction, as torch allows for BN
            raise ValueError(f"{type(self).__name__} with warmup_steps={self.warmup_steps} counts its steps in "
                             "num_batches_tracked (and compares the batch with running_mean and running_var), "
                             "got None")
        return renorm_limits(int(self.num_batches_tracked), self.rmax, self.dmax, self.warmup_steps)

    def _traced_limits(self) -> tuple:
        """:meth:`limits` as 0-D float64 tensors computed from the step counter, for ``torch.compile``,
        ``torch.export`` and ``torch.jit.trace``: the Python step count broke the compiled graph,
        and each step's limits, Python numbers, made a compiler other than "eager" recompile
        (8 recompiles, dynamo's limit, then eager for good); export refused the count, and a
        trace froze the limits of the step it saw. The ramp is the same float64 arithmetic, so
        the limits are the same numbers."""
        step = self.num_batches_tracked.to(torch.float64)
        t = (step / self.warmup_steps).clamp(max=1.0)
        done = step >= self.warmup_steps  # the limits themselves, exactly, once the ramp is over
        rmax = torch.where(done, float(self.rmax), 1.0 + t * (float(self.rmax) - 1.0))
        return rmax, torch.where(done, float(self.dmax), t * float(self.dmax))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input(input)
        if not self.training:
            return NF.batch_renorm(input, self.running_mean, self.running_var, self.weight, self.bias, False,
                                   0.0, self.eps)
        traced = _backend._compiling() or torch.jit.is_tracing()
        rmax, dmax = self._traced_limits() if self.warmup_steps > 0 and traced else self.limits()
        return self._step(lambda momentum, running_mean, running_var: NF.batch_renorm(
            input, running_mean, running_var, self.weight, self.bias, True, momentum, self.eps, rmax, dmax))

    def extra_repr(self) -> str:
        no_bias = ", bias=False" if self.affine and self.bias is None else ""  # as BatchNorm's bias argument
        return ("{num_features}, eps={eps}, momentum={momentum}, affine={affine}{no_bias}, rmax={rmax}, dmax={dmax}, "
                "warmup_steps={warmup_steps}".format(**self.__dict__, no_bias=no_bias))


_BRN_DOC = r"""Batch renormalization (Ioffe 2017) of a {layout} input.

    .. math:: y = \gamma \left(\frac{{x - \mu_B}}{{\sigma_B}} r + d\right) + \beta, \quad
              r = \mathrm{{clip}}_{{[1/r_{{max}}, r_{{max}}]}}(\sigma_B / \sigma), \quad
              d = \mathrm{{clip}}_{{[-d_{{max}}, d_{{max}}]}}((\mu_B - \mu) / \sigma)

    ``r`` and ``d`` carry no gradient. ``rmax=1, dmax=0`` is exactly batch norm; evaluation is
    batch norm's (running statistics). Running statistics follow batch norm's rule, so the
    state dict has batch norm's keys and loads into and from ``BatchNorm``.

    Args:
        num_features: C. eps: default 1e-5. momentum: default 0.1. affine: default True.
        rmax, dmax: the clipping limits (paper: 3 and 5). Defaults 3.0 and 5.0.
        warmup_steps: ramp the limits linearly from (1, 0) to (rmax, dmax) over this many
            training steps (counted by ``num_batches_tracked``); 0 = no ramp. The paper ramps
            over the first tens of thousands of steps so the running estimates settle first.
        bias: keyword-only, default True; ``False`` learns γ without β (as BatchNorm's ``bias``).

    Examples::

        >>> brn = normlab.nn.{name}(16, rmax=3.0, dmax=5.0, warmup_steps=5000)
        >>> y = brn(torch.randn({example}))
    """


class BatchRenorm1d(_BatchRenorm):
    _ranks, _layout = (2, 3), "(N, C) or (N, C, L)"
    __doc__ = _BRN_DOC.format(layout="(N, C) or (N, C, L)", name="BatchRenorm1d", example="8, 16")


class BatchRenorm2d(_BatchRenorm):
    _ranks, _layout = (4,), "(N, C, H, W)"
    __doc__ = _BRN_DOC.format(layout="(N, C, H, W)", name="BatchRenorm2d", example="8, 16, 5, 5")


class BatchRenorm3d(_BatchRenorm):
    _ranks, _layout = (5,), "(N, C, D, H, W)"
    __doc__ = _BRN_DOC.format(layout="(N, C, D, H, W)", name="BatchRenorm3d", example="8, 16, 3, 5, 5")
