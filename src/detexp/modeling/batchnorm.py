"""BatchNorm folding for inference: each eval-mode BatchNorm after a convolution becomes part
of that convolution's weights (the same results, one pass over each activation map fewer).
"""

from __future__ import annotations

import torch


def fold_batch_norms(model: torch.nn.Module) -> torch.nn.Module:
    """For inference: every BatchNorm that follows a convolution in a ``Sequential`` (the
    MobileNet backbone's ``Conv2dNormActivation`` blocks, the v2 builder's FPN and heads)
    folded into that convolution's weights and bias, in place; returns ``model``.

    In eval mode a BatchNorm is a fixed per-channel scale and shift, so the results do not
    change (up to float rounding), but one pass over each activation map is saved (a sixth
    of the default detector's CPU inference, benchmarks/RESULTS.md). The model must not be
    trained afterwards; validation during training folds a copy."""
    from torch.nn.utils.fusion import fuse_conv_bn_weights
    from torchvision.ops.misc import FrozenBatchNorm2d

    for parent in list(model.modules()):
        if not isinstance(parent, torch.nn.Sequential):
            continue
        children = list(parent.named_children())
        for (_, conv), (norm_name, norm) in zip(children, children[1:], strict=False):
            if not (isinstance(conv, torch.nn.Conv2d) and isinstance(norm, torch.nn.BatchNorm2d | FrozenBatchNorm2d)):
                continue
            if isinstance(norm, torch.nn.BatchNorm2d) and (norm.training or norm.running_mean is None):
                continue
            nhwc = conv.weight.is_contiguous(memory_format=torch.channels_last)  # trainer.channels_last
            memory_format = torch.channels_last if nhwc else torch.contiguous_format
            weight, bias = fuse_conv_bn_weights(
                conv.weight, conv.bias, norm.running_mean, norm.running_var,
                bn_eps=norm.eps, bn_w=norm.weight, bn_b=norm.bias,
            )
            conv.weight = torch.nn.Parameter(weight.detach().contiguous(memory_format=memory_format), requires_grad=False)
            conv.bias = torch.nn.Parameter(bias.detach(), requires_grad=False)
            setattr(parent, norm_name, torch.nn.Identity())
    return model
