"""Once-for-All's MobileNetV3 supernet (``ofa_mbv3_d234_e346_k357_w1.0`` / ``_w1.2``), built from ee_nas's modules.

NACHOS, EDANAS and AEBNAS (through NSGANetV2) start from OFA's ImageNet-pretrained
supernet and fine-tune it on CIFAR/SVHN. This backbone has OFA's exact layout, so an
OFA checkpoint loads tensor for tensor (``pretrained=PATH``), and every subnet computes
what OFA's ``set_active_subnet(ks, e, d)`` + ``get_active_subnet()`` computes:

- stem = OFA's first conv (3x3, stride 2, BN, h-swish) **and** its fixed first block
  (3x3 depthwise, expand 1, ReLU, residual);
- five elastic stages of ``max_depth`` blocks (widths 24, 40, 80, 112, 160 times
  ``width_mult``, rounded to multiples of 8; strides 2, 2, 2, 1, 2; ReLU, ReLU, h-swish x3;
  SE in stages 2, 4, 5), each an :class:`OFAMBConv`;
- head = final expand (1x1 conv to 960·w, BN, h-swish) -> global average pool -> feature
  mix (1x1 conv to 1280·w, no BN, h-swish) -> dropout -> linear classifier.

BatchNorm momentum/eps are OFA's (0.1, 1e-5); SE reduction 4 with widths rounded to 8.

**Elastic kernels.** OFA does not centre-crop a smaller kernel from the 7x7: it crops the
centre 5x5 and multiplies it (flattened, per channel) by a learned 25x25 matrix, then crops
that result's centre 3x3 and multiplies by a learned 9x9 matrix. :class:`KernelTransformConv2d`
holds those matrices (``transform_7to5``, ``transform_5to3``; identity at initialisation,
which is the plain centre crop) and trains them with the supernet.

**Genome and exit taps.** The backbone's blocks are OFA's elastic blocks ``blocks[1:]``:
block ``b`` here is OFA's ``blocks[b + 1]``, and a genome maps one-to-one onto OFA's
setting: ``ks = genome.kernels``, ``e = genome.expands`` (one per block, 20 at depth 4),
``d = genome.depths`` (one per stage) -- see :func:`ofa_setting` / :func:`genome_from_ofa`.
Every elastic block's output is an exit tap, as for the other backbones. OFA's fixed
first block is *not* a tap: it has no entry in OFA's ``ks``/``e`` lists, it works at the
stem's resolution on 16 channels (too early for a useful classifier), and counting it as a
one-block stage would break ``min_depth`` (OFA's stages are 2-4 deep). It belongs to the
stem, so exit branches are never offered there and the genome stays OFA's.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ee_nas.models.backbone import ElasticBackbone
from ee_nas.models.ops import MBConv, ElasticConv2d, ElasticMBConv, _centre_crop, make_divisible

log = logging.getLogger("ee_nas")

#: OFA's MobileNetV3 layout (ofa.imagenet_classification.elastic_nn.networks.OFAMobileNetV3), width 1.0
STEM_WIDTH, FIRST_BLOCK_WIDTH = 16, 16
STAGES = (  # elastic stages: width, stride of the first block, activation, squeeze-excite
    dict(width=24, stride=2, act="relu", se=False),
    dict(width=40, stride=2, act="relu", se=True),
    dict(width=80, stride=2, act="hswish", se=False),
    dict(width=112, stride=1, act="hswish", se=True),
    dict(width=160, stride=2, act="hswish", se=True),
)
FINAL_EXPAND_WIDTH, FEATURE_MIX_WIDTH = 960, 1280


class KernelTransformConv2d(ElasticConv2d):
    """Depthwise conv with OFA's elastic kernel: smaller kernels are learned linear maps of the centre crop."""

    def __init__(self, channels: int, kernel_choices: Sequence[int], stride: int = 1):
        self.kernel_set = sorted({int(k) for k in kernel_choices})
        super().__init__(channels, channels, self.kernel_set[-1], stride, depthwise=True)
        for small, big in zip(self.kernel_set, self.kernel_set[1:]):
            self.register_parameter(f"transform_{big}to{small}", nn.Parameter(torch.eye(small * small)))

    def _slice(self, in_ch: int, out_ch: int | None, kernel: int | None):
        kernel = kernel or self.max_kernel
        if kernel not in self.kernel_set:
            raise ValueError(f"kernel {kernel} is not one of this conv's kernels {self.kernel_set}")
        weight = self.weight[:in_ch]
        for big, small in zip(self.kernel_set[::-1], self.kernel_set[-2::-1]):
            if big <= kernel:
                break
            crop = _centre_crop(weight, small)
            flat = F.linear(crop.reshape(-1, small * small), getattr(self, f"transform_{big}to{small}"))
            weight = flat.view(in_ch, 1, small, small)
        return weight, None, kernel


class OFAMBConv(ElasticMBConv):
    """OFA's DynamicMBConvLayer: ElasticMBConv with OFA's elastic-kernel depthwise conv and mid-width rounding."""

    def __init__(self, max_in: int, max_out: int, expand_choices: Sequence[float], kernel_choices: Sequence[int],
                 stride: int = 1, se: bool = False, act: str = "relu"):
        super().__init__(max_in, max_out, max(expand_choices), max(kernel_choices), stride, se, act)
        self.dw_conv = KernelTransformConv2d(self.dw_conv.weight.shape[0], kernel_choices, stride)

    def _mid(self, in_ch: int, expand: float) -> int:
        return make_divisible(round(in_ch * expand))


class OFAHead(nn.Sequential):
    """final expand (1x1 conv, BN, h-swish) -> pool -> feature mix (1x1 conv, h-swish) -> dropout -> linear."""

    def __init__(self, in_ch: int, expand_width: int, mix_width: int, num_classes: int, dropout: float):
        super().__init__(
            nn.Conv2d(in_ch, expand_width, 1, bias=False), nn.BatchNorm2d(expand_width), nn.Hardswish(),
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(expand_width, mix_width, 1, bias=False), nn.Hardswish(),
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(mix_width, num_classes),
        )


class OFAMobileNetV3(ElasticBackbone):
    """OFA's elastic MobileNetV3 (depth per stage, expand ratio and kernel per block), optionally pretrained."""

    def __init__(self, width_mult: float = 1.0, max_depth: int = 4, min_depth: int = 2,
                 expand_choices: Sequence[float] = (3, 4, 6), kernel_choices: Sequence[int] = (3, 5, 7),
                 dropout: float = 0.1, bn_momentum: float = 0.1, bn_eps: float = 1e-5,
                 pretrained: str | None = None, in_channels: int = 3, num_classes: int = 1000,
                 image_size: int = 224):
        super().__init__([max_depth] * len(STAGES), min_depth, expand_choices, kernel_choices, image_size,
                         in_channels, num_classes)
        self.width_mult = float(width_mult)
        width = lambda w: make_divisible(w * self.width_mult)  # noqa: E731  (OFA: make_divisible(w * mult, 8))
        stem_w, first_w = width(STEM_WIDTH), width(FIRST_BLOCK_WIDTH)
        first_block = MBConv(nn.Sequential(
            nn.Conv2d(stem_w, stem_w, 3, 1, 1, groups=stem_w, bias=False), nn.BatchNorm2d(stem_w), nn.ReLU(),
            nn.Conv2d(stem_w, first_w, 1, bias=False), nn.BatchNorm2d(first_w)), residual=stem_w == first_w)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, stem_w, 3, 2, 1, bias=False), nn.BatchNorm2d(stem_w),
                                  nn.Hardswish(), first_block)
        blocks, in_ch = [], first_w
        for stage in STAGES:
            out = width(stage["width"])
            for i in range(max_depth):
                blocks.append(OFAMBConv(in_ch, out, self.expand_choices, self.kernel_choices,
                                        stage["stride"] if i == 0 else 1, se=stage["se"], act=stage["act"]))
                self.block_out.append(out)
                in_ch = out
        self.blocks = nn.ModuleList(blocks)
        self.head = OFAHead(in_ch, width(FINAL_EXPAND_WIDTH), width(FEATURE_MIX_WIDTH), num_classes, dropout)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum, m.eps = bn_momentum, bn_eps
        if pretrained:
            self.load_ofa_checkpoint(pretrained)
        self._record_tap_shapes()

    # -- OFA checkpoints ---------------------------------------------------------------------------------------
    def ofa_key(self, name: str) -> str:
        """The name OFA's OFAMobileNetV3 gives the tensor this backbone calls `name`."""
        part, rest = name.split(".", 1)
        if part == "stem":
            index, rest = rest.split(".", 1)
            if index != "3":
                return {"0": "first_conv.conv.", "1": "first_conv.bn."}[index] + rest
            layer, rest = rest.split(".", 2)[1:]
            return {"0": "blocks.0.conv.depth_conv.conv.", "1": "blocks.0.conv.depth_conv.bn.",
                    "3": "blocks.0.conv.point_linear.conv.", "4": "blocks.0.conv.point_linear.bn."}[layer] + rest
        if part == "head":
            index, rest = rest.split(".", 1)
            return {"0": "final_expand_layer.conv.", "1": "final_expand_layer.bn.", "4": "feature_mix_layer.conv.",
                    "8": "classifier.linear."}[index] + rest
        index, module, rest = rest.split(".", 2)
        if module == "dw_conv" and rest.startswith("transform_"):
            return f"blocks.{int(index) + 1}.conv.depth_conv.conv.{rest[len('transform_'):]}_matrix"
        if module == "se":
            return f"blocks.{int(index) + 1}.conv.depth_conv.se.fc.{rest}"
        prefix = {"expand_conv": "inverted_bottleneck.conv.conv", "expand_bn": "inverted_bottleneck.bn.bn",
                  "dw_conv": "depth_conv.conv.conv", "dw_bn": "depth_conv.bn.bn",
                  "project_conv": "point_linear.conv.conv", "project_bn": "point_linear.bn.bn"}[module]
        return f"blocks.{int(index) + 1}.conv.{prefix}.{rest}"

    def load_ofa_checkpoint(self, path: str | Path) -> None:
        """Load an OFA supernet checkpoint (``{"state_dict": ...}`` as OFA's model zoo saves it, or a state dict)."""
        from ee_nas.config import ConfigError

        where = f"backbone.pretrained={str(path)!r}"
        if not Path(path).is_file():
            raise ConfigError(f"config error: {where} does not exist (README: 'Starting from OFA's pretrained "
                              f"supernet' says how to fetch it)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ConfigError(f"config error: {where} is not a PyTorch state dict: "
                              f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
        if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
            state = state["state_dict"]
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ConfigError(f"config error: {where} holds no state dict of tensors")
        self.load_ofa_state_dict(state, where)

    def load_ofa_state_dict(self, state: Mapping[str, torch.Tensor], where: str = "the OFA state dict") -> None:
        """Copy every tensor of an OFA supernet state dict; the classifier only if `num_classes` matches.

        Raises ConfigError naming the first tensor that is missing, has another shape, or is not expected.
        """
        from ee_nas.config import ConfigError

        own = self.state_dict()
        names = {self.ofa_key(k): k for k in own}  # OFA name -> name here, in this module's order
        state = {_canonical(k, names): v for k, v in state.items()}
        misfit = f"config error: {where} does not fit backbone {type(self).__name__}(width_mult={self.width_mult:g})"
        fresh = []
        for ofa_name, name in names.items():
            if ofa_name not in state:
                if ofa_name.endswith("num_batches_tracked"):
                    continue
                raise ConfigError(f"{misfit}: {ofa_name} is missing from the checkpoint")
            got, want = tuple(state[ofa_name].shape), tuple(own[name].shape)
            if got == want:
                continue
            if ofa_name.startswith("classifier.") and got[1:] == want[1:]:
                fresh.append(name)  # another number of classes: this task's classifier starts fresh
                continue
            hint = ""
            if ofa_name == "first_conv.conv.weight" and got[0] != want[0]:
                hint = "; a width-1.2 supernet needs backbone=ofa_mbv3_w12"
            elif ofa_name == "first_conv.conv.weight":
                hint = f"; the checkpoint takes {got[1]} input channels, the data has {want[1]}"
            raise ConfigError(f"{misfit}: {ofa_name} is {list(got)} in the checkpoint, {list(want)} here{hint}")
        extra = [k for k in state if k not in names]
        if extra:
            raise ConfigError(f"{misfit}: the checkpoint's {extra[0]} has no place here "
                              f"({len(extra)} such tensors; backbone.max_depth or the choices differ?)")
        with torch.no_grad():
            for ofa_name, name in names.items():
                if ofa_name in state and name not in fresh:
                    own[name].copy_(state[ofa_name])
        log.info("loaded the OFA supernet from %s%s", where,
                 f"; classifier initialised afresh for {self.num_classes} classes" if fresh else "")


def _canonical(key: str, names: Mapping[str, str]) -> str:
    """OFA's own renaming of older checkpoints' keys (OFAMobileNetV3.load_state_dict)."""
    key = key.replace(".mobile_inverted_conv.", ".conv.")
    if key in names:
        return key
    for old, new in ((".bn.bn.", ".bn."), (".conv.conv.weight", ".conv.weight"), (".linear.linear.", ".linear."),
                     (".linear.", ".linear.linear."), ("bn.", "bn.bn."), ("conv.weight", "conv.conv.weight")):
        if old in key and key.replace(old, new) in names:
            return key.replace(old, new)
    return key


def ofa_setting(genome) -> dict[str, list]:
    """OFA's ``set_active_subnet`` arguments for the backbone part of `genome`."""
    return {"ks": list(genome.kernels), "e": [int(e) if float(e).is_integer() else e for e in genome.expands],
            "d": list(genome.depths)}


def genome_from_ofa(ks: Sequence[int], e: Sequence[float], d: Sequence[int]):
    """The backbone genome (no early exits) for OFA's ``(ks, e, d)``."""
    from ee_nas.genome import Genome

    return Genome(depths=d, expands=e, kernels=ks)
