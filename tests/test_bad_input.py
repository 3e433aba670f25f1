"""Wrong input raises ValueError/TypeError naming what was expected and what came, in every
tier, and a rejected input leaves the running statistics and the step counter untouched."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import normlab.functional as NF
import normlab.nn as NN
from normlab import reference as R
from helpers import one_thread  # noqa: F401  (autouse fixture: one intra-op thread)

x3 = torch.randn(2, 3, 4)
BOOL = torch.bool


def _mask(*rows):
    return torch.tensor(rows, dtype=BOOL)


# (id, callable, exception, message pattern: expected ... what came)
CASES = [
    # wrong rank
    ("bn2d-rank", lambda: NN.BatchNorm2d(3)(x3),
     ValueError, r"BatchNorm2d expects a 4-D input \(N, C, H, W\), got a 3-D input of shape \(2, 3, 4\)"),
    ("bn1d-rank", lambda: NN.BatchNorm1d(3)(torch.randn(2, 3, 4, 4)), ValueError, r"2-D or 3-D.*got a 4-D"),
    ("bn3d-rank", lambda: NN.BatchNorm3d(3)(x3), ValueError, r"5-D.*got a 3-D"),
    ("in1d-rank", lambda: NN.InstanceNorm1d(3)(torch.randn(3)), ValueError, r"2-D or 3-D.*got a 1-D"),
    ("sn2d-rank", lambda: NN.SwitchableNorm2d(3)(x3), ValueError, r"4-D.*got a 3-D"),
    ("brn2d-rank", lambda: NN.BatchRenorm2d(3)(x3), ValueError, r"4-D.*got a 3-D"),
    ("mbn-rank", lambda: NN.MaskedBatchNorm1d(3)(torch.randn(2, 3)), ValueError, r"3-D input \(N, C, L\), got a 2-D"),
    ("gn-rank", lambda: NN.GroupNorm(1, 4)(torch.randn(4)),
     ValueError, r"\(N, C, \*\) \(at least 2-D\), got a 1-D input of shape \(4\)"),
    ("lrn-rank", lambda: NN.LocalResponseNorm(3)(torch.randn(2, 3)), ValueError, r"3 or more dims.*got a 2-D"),
    ("F-in-rank", lambda: NF.instance_norm(torch.randn(2, 3)), ValueError, r"\(N, C, \*spatial\) \(at least 3-D\), got a 2-D"),
    ("ref-bn-rank", lambda: R.batch_norm_forward(np.ones(3)), ValueError, r"2-D or 3-D or 4-D or 5-D.*got a 1-D"),
    ("ref-lrn-rank", lambda: R.local_response_norm_forward(np.ones((2, 3)), 3), ValueError, r"3 or more.*2-D"),
    # wrong channel count
    ("bn-channels", lambda: NN.BatchNorm1d(4)(x3), ValueError, r"built for 4 channels.*has 3 along dim 1"),
    ("in-channels", lambda: NN.InstanceNorm1d(4)(x3), ValueError, r"built for 4 channels.*has 3 along dim 1"),
    ("in-unbatched-channels", lambda: NN.InstanceNorm2d(3)(x3), ValueError,
     r"built for 3 channels.*has 2 along dim 0: input shape \(2, 3, 4\)"),
    ("gn-channels", lambda: NN.GroupNorm(2, 4)(x3), ValueError, r"built for 4 channels \(num_channels=4\).*has 3"),
    ("sn-channels", lambda: NN.SwitchableNorm1d(5)(x3), ValueError, r"built for 5 channels.*has 3"),
    ("brn-channels", lambda: NN.BatchRenorm1d(4)(x3), ValueError, r"built for 4 channels.*has 3"),
    ("mbn-channels", lambda: NN.MaskedBatchNorm1d(2)(x3, None), ValueError, r"built for 2 channels.*has 3"),
    ("F-bn-weight", lambda: NF.batch_norm(x3, None, None, torch.ones(4), None, True), ValueError,
     r"weight must have shape \(3,\).*got shape \(4,\)"),
    # one value per channel in training
    ("bn-one-value", lambda: NN.BatchNorm1d(3)(torch.randn(1, 3)), ValueError,
     r"more than 1 value per channel.*shape \(1, 3\) \(1 value per channel\)"),
    ("bn2d-one-value", lambda: NN.BatchNorm2d(3)(torch.randn(1, 3, 1, 1)),
     ValueError, r"more than 1 value per channel.*\(1, 3, 1, 1\)"),
    ("in-one-position", lambda: NN.InstanceNorm1d(3)(torch.randn(2, 3, 1)), ValueError,
     r"more than 1 value per instance.*\(2, 3, 1\)"),
    ("sn-one-value", lambda: NN.SwitchableNorm1d(3)(torch.randn(1, 3)), ValueError, r"more than 1 value per channel"),
    ("brn-one-value", lambda: NN.BatchRenorm1d(3)(torch.randn(1, 3)), ValueError, r"more than 1 value per channel"),
    ("mbn-one-valid", lambda: NN.MaskedBatchNorm1d(3)(torch.randn(1, 3, 4), _mask([True, False, False, False])),
     ValueError, r"more than 1 valid position per channel, got 1"),
    ("ref-bn-one-value", lambda: R.batch_norm_forward(np.ones((1, 3))), ValueError, r"more than 1 value per channel"),
    ("ref-in-one-position", lambda: R.instance_norm_forward(np.ones((2, 3, 1))), ValueError, r"per instance"),
    # masks
    ("mask-shape", lambda: NN.MaskedBatchNorm1d(3)(x3, torch.ones(2, 5, dtype=BOOL)), ValueError,
     r"mask of shape \(N, L\) = \(2, 4\).*got a mask of shape \(2, 5\)"),
    ("mask-dtype", lambda: NN.MaskedBatchNorm1d(3)(x3, torch.ones(2, 4)),
     TypeError, r"boolean mask.*got dtype torch.float32"),
    ("mask-int-dtype", lambda: NN.MaskedBatchNorm1d(3)(x3, torch.ones(2, 4, dtype=torch.long)),
     TypeError, r"boolean.*int64"),
    ("mask-all-padding", lambda: NN.MaskedBatchNorm1d(3)(x3, torch.zeros(2, 4, dtype=BOOL)), ValueError,
     r"whole batch is padding"),
    ("mask-one-sequence-padding", lambda: NN.MaskedBatchNorm1d(3)(x3, _mask([True] * 4, [False] * 4)), ValueError,
     r"sequence\(s\) \[1\].*all padding"),
    ("mask-padding-in-eval", lambda: NN.MaskedBatchNorm1d(3).eval()(x3, _mask([True] * 4, [False] * 4)), ValueError,
     r"sequence\(s\) \[1\]"),
    ("ref-mask-dtype", lambda: R.masked_batch_norm_forward(np.ones((2, 3, 4)), np.ones((2, 4))), TypeError,
     r"boolean mask.*float64"),
    ("ref-mask-shape", lambda: R.masked_batch_norm_forward(np.ones((2, 3, 4)), np.ones((2, 3), bool)), ValueError,
     r"\(2, 4\).*got a mask of shape \(2, 3\)"),
    ("ref-mask-all-padding", lambda: R.masked_batch_norm_forward(np.ones((2, 3, 4)), np.zeros((2, 4), bool)),
     ValueError,
     r"whole batch is padding"),
    # integer input
    ("bn-int", lambda: NN.BatchNorm1d(3)(torch.ones(2, 3, dtype=torch.int64)),
     TypeError, r"floating-point.*got dtype torch.int64"),
    ("ln-int", lambda: NN.LayerNorm(4)(torch.ones(2, 4, dtype=torch.int32)), TypeError, r"floating-point.*torch.int32"),
    ("gn-int", lambda: NN.GroupNorm(1, 3)(torch.ones(2, 3, 2, dtype=torch.int64)), TypeError, r"floating-point.*int64"),
    ("in-int", lambda: NN.InstanceNorm1d(3)(torch.ones(2, 3, 2, dtype=torch.int64)),
     TypeError, r"floating-point.*int64"),
    ("rms-int", lambda: NN.RMSNorm(4)(torch.ones(2, 4, dtype=torch.int64)), TypeError, r"floating-point.*int64"),
    ("sn-int", lambda: NN.SwitchableNorm1d(3)(torch.ones(2, 3, dtype=torch.int64)),
     TypeError, r"floating-point.*int64"),
    ("brn-int", lambda: NN.BatchRenorm1d(3)(torch.ones(2, 3, dtype=torch.int64)), TypeError, r"floating-point.*int64"),
    ("mbn-int", lambda: NN.MaskedBatchNorm1d(3)(torch.ones(2, 3, 4, dtype=torch.int64)),
     TypeError, r"floating-point.*int64"),
    ("lrn-int", lambda: NN.LocalResponseNorm(3)(torch.ones(2, 3, 4, dtype=torch.int64)),
     TypeError, r"floating-point.*int64"),
    ("selu-int", lambda: NN.SELU()(torch.ones(3, dtype=torch.int64)), TypeError, r"floating-point.*int64"),
    ("ref-bn-int", lambda: R.batch_norm_forward(np.ones((2, 3), dtype=np.int64)), TypeError, r"floating-point.*int64"),
    ("ref-ln-int", lambda: R.layer_norm_forward(np.ones((2, 3), dtype=np.int32), 3),
     TypeError, r"floating-point.*int32"),
    # normalized_shape not matching the trailing dims
    ("ln-shape", lambda: NN.LayerNorm(5)(x3), ValueError, r"normalized_shape=\(5\).*shape \(2, 3, 4\) does not end"),
    ("ln-shape-2d", lambda: NN.LayerNorm((3, 5))(x3), ValueError, r"normalized_shape=\(3, 5\).*\(2, 3, 4\)"),
    ("ln-shape-2d-leading", lambda: NN.LayerNorm((5, 4))(x3), ValueError, r"normalized_shape=\(5, 4\).*\(2, 3, 4\)"),
    ("rms-shape", lambda: NN.RMSNorm(5)(x3), ValueError, r"normalized_shape=\(5\).*\(2, 3, 4\)"),
    ("F-ln-weight", lambda: NF.layer_norm(x3, (4,), torch.ones(3)),
     ValueError, r"weight must have shape.*\(4\), got \(3\)"),
    ("F-ln-bias", lambda: NF.layer_norm(x3, (4,), torch.ones(4), torch.ones(3)),
     ValueError, r"layer_norm: bias must have shape.*\(4\), got \(3\)"),
    ("ref-ln-shape", lambda: R.layer_norm_forward(np.ones((2, 3)), 4), ValueError, r"normalized_shape=\(4\).*\(2, 3\)"),
    # groups
    ("gn-groups", lambda: NN.GroupNorm(2, 3), ValueError, r"num_groups=2 must .*divide the number of channels 3"),
    ("gn-groups-zero", lambda: NN.GroupNorm(0, 3), ValueError, r"num_groups must be a positive int, got 0"),
    ("gn-groups-float", lambda: NN.GroupNorm(2.0, 4), ValueError, r"num_groups must be a positive int, got 2.0"),
    ("gn-groups-bool", lambda: NN.GroupNorm(True, 4), ValueError, r"num_groups must be a positive int, got True"),
    ("lrn-size-float", lambda: NN.LocalResponseNorm(2.5), ValueError, r"size \(a number of channels\) must be a positive int, got 2.5"),
    ("F-gn-groups", lambda: NF.group_norm(x3, 2), ValueError, r"num_groups=2.*channels 3"),
    ("ref-gn-groups", lambda: R.group_norm_forward(np.ones((2, 3, 4)), 2), ValueError, r"num_groups=2.*channels 3"),
    ("F-bn-eps0-train", lambda: NF.batch_norm(torch.randn(4, 3), None, None, training=True, eps=0.0), ValueError,
     r"eps must be positive in training.*got eps=0.0"),
    ("gn-single-values", lambda: NN.GroupNorm(3, 3)(torch.randn(1, 3)), ValueError,
     r"each of the 3 groups holds a single value \(1 channel\(s\) x 1 position\(s\)\) in input of shape \(1, 3\)"),
    # torch returns the bias here (N > 1); one value per group normalizes to 0 whatever it is
    ("gn-single-value-per-group", lambda: NN.GroupNorm(4, 4)(torch.randn(5, 4)), ValueError,
     r"4 groups holds a single value.*use fewer groups"),
    ("F-gn-single-value-per-group", lambda: NF.group_norm(torch.randn(2, 4, 1, 1), 4), ValueError,
     r"single value \(1 channel\(s\) x 1 position\(s\)\)"),
    ("ref-gn-single-value-per-group", lambda: R.group_norm_forward(np.random.randn(2, 4, 1), 4), ValueError,
     r"single value"),
    # make_norm and renorm limits
    ("make-bool-channels", lambda: NN.make_norm("batch", True), ValueError, r"num_channels must be a positive int, got True"),
    ("make-bool-dim", lambda: NN.make_norm("batch", 4, dim=True), ValueError, r"must be 0, 1, 2 or 3, got True"),
    ("make-unknown", lambda: NN.make_norm("batchy", 3),
     ValueError, r"unknown norm spec 'batchy'; known: batch, batch_renorm"),
    ("brn-rmax", lambda: NN.BatchRenorm1d(3, rmax=0.5), ValueError, r"rmax >= 1.*got rmax=0.5"),
    ("brn-dmax", lambda: NN.BatchRenorm1d(3, dmax=-1.0), ValueError, r"dmax >= 0.*dmax=-1.0"),
    ("brn-warmup", lambda: NN.BatchRenorm1d(3, warmup_steps=-1), ValueError, r"warmup_steps >= 0.*warmup_steps=-1"),
    ("F-brn-rmax", lambda: NF.batch_renorm(x3, torch.zeros(3), torch.ones(3), training=True, rmax=0.5), ValueError,
     r"need rmax >= 1, dmax >= 0, got rmax=0.5"),
    ("F-brn-eval-weight", lambda: NF.batch_renorm(x3, torch.zeros(3), torch.ones(3), torch.ones(4)), ValueError,
     r"^batch_renorm: weight must have shape \(3,\)"),
    ("F-brn-eval-int", lambda: NF.batch_renorm(torch.ones(2, 3, dtype=torch.int64), torch.zeros(3), torch.ones(3)),
     TypeError, r"^batch_renorm expects a floating-point input"),
    ("F-brn-no-running", lambda: NF.batch_renorm(x3, None, None, training=True),
     ValueError, r"needs running_mean.*got None"),
    ("ref-brn-rmax", lambda: R.batch_renorm_forward(np.random.randn(4, 3), None, None,
                                                    R.RunningStats(np.zeros(3), np.ones(3)), rmax=0.5), ValueError,
     r"need rmax >= 1, dmax >= 0, got rmax=0.5"),
    ("ref-brn-no-running", lambda: R.batch_renorm_forward(np.ones((2, 3)), None, None, None),
     ValueError, r"running=None"),
    # eps: torch accepts a negative eps and returns NaN; normlab's per-channel layers refuse it
    ("bn-eps", lambda: NN.BatchNorm2d(3, eps=-1e-5), ValueError, r"BatchNorm2d: eps must be a number >= 0.*eps=-1e-05"),
    ("sn-eps", lambda: NN.SwitchableNorm2d(3, eps=float("nan")), ValueError, r"SwitchableNorm2d: eps .*eps=nan"),
    ("brn-eps", lambda: NN.BatchRenorm1d(3, eps=-1.0), ValueError, r"BatchRenorm1d: eps .*eps=-1.0"),
    ("mbn-eps", lambda: NN.MaskedBatchNorm1d(3, eps=-1.0), ValueError, r"MaskedBatchNorm1d: eps .*eps=-1.0"),
    # other arguments
    ("F-sn-logits", lambda: NF.switchable_norm(x3, None, None, None, None, torch.ones(2), torch.ones(3)), ValueError,
     r"mean_weight must hold 3 logits.*got shape \(2,\)"),
    ("lrn-size", lambda: NF.local_response_norm(x3, 0), ValueError, r"size \(a number of channels\) must be a positive int, got 0"),
    ("alpha-dropout-p", lambda: NN.AlphaDropout(1.5), ValueError, r"p must be a probability in \[0, 1\], got 1.5"),
    ("F-alpha-dropout-p", lambda: NF.alpha_dropout(x3, -0.1), ValueError, r"\[0, 1\], got -0.1"),
    ("ref-alpha-dropout-p", lambda: R.alpha_dropout_forward(np.ones(3), 2.0), ValueError, r"\[0, 1\], got 2.0"),
    # NaN limits fail every comparison: written so that they are refused
    ("brn-rmax-nan", lambda: NN.BatchRenorm1d(3, rmax=float("nan")), ValueError, r"rmax >= 1.*got rmax=nan"),
    ("brn-dmax-nan", lambda: NN.BatchRenorm1d(3, dmax=float("nan")), ValueError, r"dmax=nan"),
    ("brn-warmup-nan", lambda: NN.BatchRenorm1d(3, warmup_steps=float("nan")), ValueError, r"warmup_steps=nan"),
    ("F-brn-rmax-nan", lambda: NF.batch_renorm(x3, torch.zeros(3), torch.ones(3), training=True, rmax=float("nan")),
     ValueError, r"got rmax=nan"),
    ("ref-brn-dmax-nan", lambda: R.batch_renorm_forward(np.random.randn(4, 3), None, None,
                                                        R.RunningStats(np.zeros(3), np.ones(3)), dmax=float("nan")),
     ValueError, r"dmax=nan"),
    # momentum: torch accepts NaN and values outside [0, 1] (NaN or extrapolated running stats)
    *[(f"momentum-{m!r}-{cls.__name__}", lambda m=m, cls=cls: cls(3, momentum=m), ValueError,
       rf"{cls.__name__}: momentum must be None or a number in \[0, 1\].*got momentum={m!r}")
      for m in (float("nan"), -1.0, 1.5) for cls in (NN.BatchNorm1d, NN.InstanceNorm1d, NN.SwitchableNorm1d,
                                                     NN.BatchRenorm1d, NN.MaskedBatchNorm1d, NN.SyncBatchNorm)],
    ("ref-momentum", lambda: R.batch_norm_forward(np.random.randn(4, 3), running=R.RunningStats(np.zeros(3), np.ones(3)),
                                                  momentum=float("nan")), ValueError, r"batch_norm: momentum must be"),
    # eps on every layer and in the reference
    ("ln-eps", lambda: NN.LayerNorm(4, eps=float("nan")), ValueError, r"LayerNorm: eps must be a number >= 0"),
    ("gn-eps", lambda: NN.GroupNorm(1, 4, eps=-1.0), ValueError, r"GroupNorm: eps must be a number >= 0"),
    ("rms-eps", lambda: NN.RMSNorm(4, eps=-1e-6), ValueError, r"RMSNorm: eps must be a number >= 0"),
    ("ref-bn-eps", lambda: R.batch_norm_forward(np.random.randn(4, 3), eps=-1.0), ValueError, r"batch_norm: eps must"),
    ("ref-ln-eps", lambda: R.layer_norm_forward(np.random.randn(4, 3), 3, eps=float("nan")), ValueError,
     r"layer_norm: eps must"),
    # normalized_shape
    ("ln-empty-shape", lambda: NN.LayerNorm(()), ValueError, r"normalized_shape must be a size or a non-empty"),
    ("ln-negative-shape", lambda: NN.LayerNorm(-1), ValueError, r"sizes \(ints >= 0\).*got -1"),
    ("ln-bool-shape", lambda: NF.layer_norm(torch.randn(2, 1), True), ValueError,
     r"normalized_shape must be a size.*got True"),
    ("rms-float-shape", lambda: NN.RMSNorm((2.5,)), ValueError, r"normalized_shape must.*got \(2.5,\)"),
    ("ref-ln-np-int", lambda: R.layer_norm_forward(np.random.randn(4, 3), np.int64(4)), ValueError,
     r"trailing dims normalized_shape=\(4\)"),
    # reference parameters of the wrong size (NumPy would broadcast a 1-element gamma silently)
    ("F-gn-weight-3d", lambda: NF.group_norm(torch.randn(2, 4, 3), 2, torch.ones(1, 4, 1)), ValueError,
     r"group_norm: weight must have shape \(4,\).*got shape \(1, 4, 1\)"),
    ("ref-bn-gamma-2d", lambda: R.batch_norm_forward(np.random.randn(4, 3), np.ones((2, 1))), ValueError,
     r"gamma must have 3 elements.*got shape \(2, 1\)"),
    ("F-bn-weight-0d", lambda: NF.batch_norm(x3, None, None, torch.tensor(2.0), None, True), ValueError,
     r"weight must have shape \(3,\).*got shape \(\)"),
    ("ref-bn-gamma-size", lambda: R.batch_norm_forward(np.random.randn(4, 3), np.array([2.0])), ValueError,
     r"batch_norm: gamma must have 3 elements \(one value per channel\), got shape \(1,\)"),
    ("ref-bn-running-size", lambda: R.batch_norm_forward(np.random.randn(4, 3), running=R.RunningStats(np.zeros(1), np.ones(1)),
                                                         training=False), ValueError, r"running_mean must have 3 elements"),
    ("ref-gn-gamma-per-group", lambda: R.group_norm_forward(np.random.randn(2, 4, 3), 2, np.ones(2)), ValueError,
     r"group_norm: gamma must have 4 elements"),
    ("ref-in-beta-size", lambda: R.instance_norm_forward(np.random.randn(2, 4, 3), None, np.ones(5)), ValueError,
     r"beta must have 4 elements"),
    ("ref-ln-gamma-shape", lambda: R.layer_norm_forward(np.random.randn(4, 3), 3, np.array([2.0])), ValueError,
     r"layer_norm: gamma must have shape normalized_shape=\(3\), got \(1\)"),
    ("ref-rms-gamma-shape", lambda: R.rms_norm_forward(np.random.randn(4, 3), 3, np.ones(4)), ValueError,
     r"rms_norm: gamma must have shape"),
    ("ref-sn-logits", lambda: R.switchable_norm_forward(np.random.randn(4, 3, 2), None, None, np.zeros(4), np.zeros(3)),
     ValueError, r"mean_weight must hold 3 logits \(IN, LN, BN\), got shape \(4,\)"),
    ("ref-mbn-gamma-size", lambda: R.masked_batch_norm_forward(np.random.randn(2, 3, 4), None, np.ones(2)), ValueError,
     r"gamma must have 3 elements"),
    ("ref-in-no-running", lambda: R.instance_norm_forward(np.random.randn(2, 3, 4), use_input_stats=False), ValueError,
     r"use_input_stats=False normalizes with the running statistics, got running=None"),
    ("ref-selu-int", lambda: R.selu_forward(np.array([1, 2, -1])), TypeError, r"selu expects a floating-point input"),
    ("ref-alpha-dropout-int", lambda: R.alpha_dropout_forward(np.array([1, 2, -1]), 0.5), TypeError,
     r"alpha_dropout expects a floating-point input"),
    # functional running statistics: a pair, and a number for momentum when they move
    ("F-mbn-one-running", lambda: NF.masked_batch_norm(x3, None, torch.zeros(3), None, training=False), ValueError,
     r"masked_batch_norm: pass both running_mean and running_var or neither, got only running_mean"),
    ("F-sn-one-running", lambda: NF.switchable_norm(x3, None, torch.ones(3), None, None, torch.ones(3), torch.ones(3)),
     ValueError, r"got only running_var"),
    ("F-mbn-momentum-none", lambda: NF.masked_batch_norm(x3, _mask([1, 1, 1, 0], [1, 1, 0, 0]), torch.zeros(3),
                                                          torch.ones(3), training=True, momentum=None), TypeError,
     r"momentum must be a number when training updates the running statistics, got None"),
    # not a tensor / not an array
    *[(f"numpy-into-{type(m).__name__}", lambda m=m: m(np.ones((4, 3, 5), np.float32)), TypeError,
       r"expects a torch.Tensor input, got ndarray \(a NumPy array: wrap it with torch.from_numpy\)")
      for m in (NN.BatchNorm1d(3), NN.LayerNorm(5), NN.RMSNorm(5), NN.GroupNorm(1, 3), NN.InstanceNorm1d(3),
                NN.SwitchableNorm1d(3), NN.BatchRenorm1d(3), NN.MaskedBatchNorm1d(3), NN.LocalResponseNorm(2),
                NN.SELU(), NN.AlphaDropout(0.2), NN.SyncBatchNorm(3))],
    ("float-into-selu", lambda: NN.SELU()(1.0), TypeError, r"selu expects a torch.Tensor input, got float"),
    ("mbn-numpy-mask", lambda: NN.MaskedBatchNorm1d(3)(x3, np.ones((2, 4), bool)), TypeError,
     r"expects the mask as a torch.Tensor \(bool, shape \(N, L\)\), got ndarray"),
    ("ref-list", lambda: R.batch_norm_forward([[1.0, 2.0], [3.0, 4.0]]), TypeError,
     r"batch_norm \(the NumPy reference\) expects a NumPy array, got list"),
    ("ref-tensor", lambda: R.layer_norm_forward(torch.randn(2, 3), 3), TypeError,
     r"expects a NumPy array, got Tensor \(a torch tensor: pass t.detach\(\).cpu\(\).numpy\(\)\)"),
    ("mbn-eps0-train", lambda: NN.MaskedBatchNorm1d(3, eps=0)(x3, torch.ones(2, 4, dtype=BOOL)), ValueError,
     r"masked_batch_norm: eps must be positive in training"),
    ("sn-eps0-train", lambda: NN.SwitchableNorm1d(3, eps=0)(x3), ValueError,
     r"switchable_norm: eps must be positive in training"),
    # strings parse as floats, then failed far away in NumPy's arithmetic
    ("ref-eps-str", lambda: R.batch_norm_forward(np.ones((4, 3)), eps="1e-5"), ValueError, r"eps must be a number >= 0.*got eps='1e-5'"),
    ("ref-momentum-str", lambda: R.batch_norm_forward(np.ones((4, 3)), running=R.RunningStats(np.zeros(3), np.ones(3)),
                                                      momentum="0.1"), ValueError, r"momentum must be None or a number"),
    ("ref-rmax-str", lambda: R.batch_renorm_forward(np.ones((4, 3)), None, None, R.RunningStats(np.zeros(3), np.ones(3)),
                                                    rmax="3"), ValueError, r"need rmax >= 1, dmax >= 0, got rmax='3'"),
    ("ref-lrn-size-float", lambda: R.local_response_norm_forward(np.ones((2, 3, 4)), 3.0), ValueError,
     r"local_response_norm: size \(a number of channels\) must be a positive int, got 3.0"),
    ("ref-lrn-size-bool", lambda: R.local_response_norm_forward(np.ones((2, 3, 4)), True), ValueError,
     r"size \(a number of channels\) must be a positive int, got True"),
    ("ref-renorm-limits", lambda: R.renorm_limits(5, 0.5, -1.0, 10), ValueError, r"renorm_limits: need rmax >= 1, dmax >= 0"),
    ("ref-renorm-step", lambda: R.renorm_limits(-1, 3.0, 5.0, 10), ValueError, r"step must be >= 0"),
    ("ref-dy-shape", lambda: R.batch_norm_backward(np.ones((1, 3)), R.batch_norm_forward(np.random.rand(4, 3))[1]),
     ValueError, r"dy must have the forward output's shape \(4, 3\), got \(1, 3\)"),
    ("ref-group-dy-transposed", lambda: R.group_norm_backward(  # the reshape took it: wrong gradients
        np.ones((2, 3, 4)), R.group_norm_forward(np.random.rand(2, 4, 3), 2)[1]),
     ValueError, r"dy must have the forward output's shape \(2, 4, 3\), got \(2, 3, 4\)"),
    ("ref-selu-dy-shape", lambda: R.selu_backward(np.ones((1, 3)), R.selu_forward(np.ones((4, 3)))[1]),
     ValueError, r"dy must have the forward output's shape \(4, 3\), got \(1, 3\)"),
    ("ref-switchable-dy-shape", lambda: R.switchable_norm_backward(
        np.ones((4, 3)), R.switchable_norm_forward(np.random.rand(4, 3, 2), None, None, np.ones(3), np.ones(3))[1]),
     ValueError, r"dy must have the forward output's shape \(4, 3, 2\), got \(4, 3\)"),
]


@pytest.mark.parametrize("call,exc,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_clear_error(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_reference_takes_lists_for_per_channel_parameters_and_running_statistics():
    """'list' object has no attribute 'shape' came from the checks and the running update."""
    x = np.random.default_rng(0).standard_normal((4, 3))
    y, _, running = R.batch_norm_forward(x, [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], R.RunningStats([0.0] * 3, [1.0] * 3))
    want, _, want_running = R.batch_norm_forward(x, np.ones(3), np.zeros(3), R.RunningStats(np.zeros(3), np.ones(3)))
    np.testing.assert_array_equal(y, want)
    np.testing.assert_array_equal(running.var, want_running.var)


def _const(value):
    return np.concatenate([np.random.default_rng(0).standard_normal((4, 2, 5)), np.full((4, 1, 5), value)], axis=1)


@pytest.mark.parametrize("call", [
    lambda x: R.batch_norm_forward(x, eps=0.0),
    lambda x: R.instance_norm_forward(x, eps=0.0),
    lambda x: R.layer_norm_forward(x[:, 2:], (1, 5), eps=0.0),
    lambda x: R.group_norm_forward(x, 3, eps=0.0),
    lambda x: R.rms_norm_forward(x * 0, 5, eps=0.0),
    lambda x: R.masked_batch_norm_forward(x, np.ones((4, 5), bool), eps=0.0),
    lambda x: R.batch_renorm_forward(x, None, None, R.RunningStats(np.zeros(3), np.ones(3)), eps=0.0),
    lambda x: R.switchable_norm_forward(x * 0, None, None, np.ones(3), np.ones(3), eps=0.0),  # mixes the branches
], ids=["batch", "instance", "layer", "group", "rms", "masked", "renorm", "switchable"])
def test_reference_eps_zero_on_a_constant_group_is_an_error_not_nan(call):
    """0/0: the reference returned NaN (with a RuntimeWarning); eps=0 itself stays allowed (the
    lab's invariance experiment uses it on data with spread)."""
    with pytest.raises(ValueError, match=r"eps=0 divides 0 by 0 .* groups here; pass eps > 0"):
        call(_const(3.0))
    assert np.isfinite(R.batch_norm_forward(_const(3.0)[:, :2], eps=0.0)[0]).all()


@pytest.mark.parametrize("call", [
    lambda: R.batch_norm_forward(np.full((3, 2), 0.1), eps=0),
    lambda: R.layer_norm_forward(np.full((1, 3), 0.1), 3, eps=0),
    lambda: R.group_norm_forward(np.full((1, 2, 3), 0.1), 1, eps=0),
    lambda: R.instance_norm_forward(np.full((1, 2, 3), 0.1), eps=0),
], ids=["batch", "layer", "group", "instance"])
def test_reference_eps_zero_on_a_constant_its_mean_rounds_is_an_error_too(call):
    """Three values of 0.1 sum to a mean 1 ulp off: the deviations were -1.4e-17, the variance
    1.9e-34 rather than 0, and with eps=0 every output came out -1 without an error. The corrected
    two-pass mean recovers the ulp, so the variance is 0 and the check fires.
    Wrong version: reference/_core.py centered_moments without the ``r`` correction."""
    with pytest.raises(ValueError, match=r"eps=0 divides 0 by 0"):
        call()


def _trained(m, x, *args):
    m(x, *args)  # one good step, so the state is not the initial one
    return {k: v.clone() for k, v in m.state_dict().items()}


REJECTED = [
    ("bn-one-value", lambda: NN.BatchNorm1d(3), torch.randn(4, 3), (torch.randn(1, 3),)),
    ("bn-channels", lambda: NN.BatchNorm2d(3), torch.randn(2, 3, 2, 2), (torch.randn(2, 4, 2, 2),)),
    ("bn-momentum-none", lambda: NN.BatchNorm1d(3, momentum=None), torch.randn(4, 3), (torch.randn(1, 3),)),
    ("sn-one-value", lambda: NN.SwitchableNorm1d(3), torch.randn(4, 3), (torch.randn(1, 3),)),
    ("brn-one-value", lambda: NN.BatchRenorm1d(3, warmup_steps=5), torch.randn(4, 3), (torch.randn(1, 3),)),
    ("brn-int", lambda: NN.BatchRenorm2d(3), torch.randn(2, 3, 2, 2), (torch.ones(2, 3, 2, 2, dtype=torch.long),)),
    ("in-one-position", lambda: NN.InstanceNorm1d(3, track_running_stats=True), torch.randn(2, 3, 4),
     (torch.randn(2, 3, 1),)),
    ("mbn-all-padding", lambda: NN.MaskedBatchNorm1d(3), torch.randn(2, 3, 4),
     (x3, torch.zeros(2, 4, dtype=BOOL))),
    ("mbn-one-sequence", lambda: NN.MaskedBatchNorm1d(3), torch.randn(2, 3, 4), (x3, _mask([True] * 4, [False] * 4))),
    ("mbn-mask-dtype", lambda: NN.MaskedBatchNorm1d(3), torch.randn(2, 3, 4), (x3, torch.ones(2, 4))),
    ("mbn-mask-shape", lambda: NN.MaskedBatchNorm1d(3), torch.randn(2, 3, 4), (x3, torch.ones(2, 3, dtype=BOOL))),
]


@pytest.mark.parametrize("make,good,bad", [r[1:] for r in REJECTED], ids=[r[0] for r in REJECTED])
def test_rejected_input_leaves_state_untouched(make, good, bad):
    m = make()
    before = _trained(m, good)
    with pytest.raises((ValueError, TypeError)):
        m(*bad)
    after = m.state_dict()
    assert list(after) == list(before)
    for k in before:
        assert torch.equal(after[k], before[k]), f"{k} changed by a rejected input"


def test_make_norm_bad_arguments():
    for spec, kw, pattern in [("", {}, r"non-empty string.*got ''"), (None, {}, r"non-empty string.*got None"),
                              ("batch", dict(dim=4), r"must be 0, 1, 2 or 3, got 4"),
                              ("batch", dict(num_channels=0), r"positive int, got 0"),
                              ("group:x", {}, r"must be an integer, got 'x'"), ("group:0", {}, r"must be positive"),
                              ("lrn", dict(dim=2), r"needs a size.*'lrn:5'"), ("batch:3", {}, r"takes no argument")]:
        kw = {"num_channels": 4, **kw}
        with pytest.raises(ValueError, match=pattern):
            NN.make_norm(spec, **kw)


def test_eps_of_any_real_scalar_type_is_accepted():
    # the eps check must not refuse what torch takes: a NumPy float32, an int 0
    assert NN.BatchNorm2d(3, eps=np.float32(1e-5)).eps == np.float32(1e-5)
    assert NN.MaskedBatchNorm1d(3, eps=0).eps == 0
    with pytest.raises(ValueError, match=r"eps must be a number >= 0.*eps='small'"):
        NN.BatchNorm1d(3, eps="small")


def test_a_mask_on_another_device_than_the_input_says_so():
    """The mask must live where the input does: a mask on another device failed with a bare
    'Cannot copy out of meta tensor; no data!' (meta) or a device mismatch inside bmm (CUDA)."""
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"mask on the input's device \(cpu\), got a mask on meta"):
        NN.MaskedBatchNorm1d(3)(x, torch.ones(2, 4, dtype=BOOL, device="meta"))
