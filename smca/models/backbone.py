"""ResNet backbone, weights from a local file: DETR's frozen fine-tuning set-up, or all layers
trainable with BatchNorm for training from scratch."""
import os
from typing import Dict, List, Optional, Sequence

import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from ..config import BACKBONE_NORMS

__all__ = ["Backbone", "load_resnet_weights", "CHANNELS", "STRIDES"]

# Output channels of layer1..layer4 (strides 4, 8, 16, 32).
CHANNELS = {
    "resnet18": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
}
STRIDES = (4, 8, 16, 32)


def load_resnet_weights(resnet: nn.Module, path: str) -> None:
    """Loads a torchvision ResNet state dict (the classifier `fc.*` may be absent) from `path`.

    Raises FileNotFoundError for a missing file and ValueError when the keys or shapes do not
    match the architecture, naming the first offending keys.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"backbone_weights: no such file {path!r}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"backbone_weights: {path!r} is not a state dict of tensors")
    # BatchNorm's step counter is bookkeeping that files may or may not carry.
    state = {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}
    expected = {
        k: v.shape
        for k, v in resnet.state_dict().items()
        if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(expected) & set(state) if state[k].shape != expected[k])
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"backbone_weights: {path!r} does not fit the {type(resnet).__name__} backbone: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}, wrong shape {wrong_shape[:5]}"
        )
    resnet.load_state_dict(state, strict=False)


class Backbone(nn.Module):
    """torchvision ResNet trunk returning the maps of the requested layers (no classifier).

    norm "frozen" is DETR's recipe for pretrained weights: every BatchNorm is a
    FrozenBatchNorm2d, the stem (conv1, bn1) and layer1 are frozen. norm "batch" is for random
    weights: a frozen BatchNorm is then an identity that leaves the activations of a random
    trunk unbounded, so it keeps trainable BatchNorm2d and trains every layer (under DDP on
    GPUs the training script converts it to SyncBatchNorm). What trains does so at the backbone learning
    rate (see SMCADETR.param_groups).

    Args:
        name: "resnet50" or "resnet18".
        weights: path of a torchvision ResNet state dict, or None for random weights.
        return_layers: which of "layer2", "layer3", "layer4" to return, in that order.
        norm: "frozen" or "batch" (above).
        trainable: False freezes every parameter (DETR's lr_backbone 0).
    Attributes:
        strides, num_channels: per returned layer.
    """

    def __init__(
        self,
        name: str,
        weights: Optional[str],
        return_layers: Sequence[str],
        norm: str = "frozen",
        trainable: bool = True,
    ) -> None:
        super().__init__()
        if name not in CHANNELS:
            raise ValueError(f"backbone: expected one of {sorted(CHANNELS)}, got {name!r}")
        if norm not in BACKBONE_NORMS:
            raise ValueError(f"backbone_norm: expected one of {BACKBONE_NORMS}, got {norm!r}")
        norm_layer = FrozenBatchNorm2d if norm == "frozen" else nn.BatchNorm2d
        resnet = getattr(torchvision.models, name)(weights=None, norm_layer=norm_layer)
        if weights is not None:
            load_resnet_weights(resnet, weights)
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.layer1, self.layer2 = resnet.layer1, resnet.layer2
        self.layer3, self.layer4 = resnet.layer3, resnet.layer4
        if not trainable:
            frozen = list(self.parameters())
        elif norm == "frozen":
            frozen = [*self.stem.parameters(), *self.layer1.parameters()]
        else:
            frozen = []
        for p in frozen:
            p.requires_grad_(False)
        layer_names = ("layer1", "layer2", "layer3", "layer4")
        self.return_layers = list(return_layers)
        index = [layer_names.index(n) for n in self.return_layers]
        self.strides: List[int] = [STRIDES[i] for i in index]
        self.num_channels: List[int] = [CHANNELS[name][i] for i in index]

    def forward(self, images: Tensor) -> Dict[str, Tensor]:
        """images (B, 3, H, W) -> {layer name: (B, C_l, ceil(H / stride_l), ceil(W / stride_l))}."""
        x = self.stem(images)
        out = {}
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
            if name in self.return_layers:
                out[name] = x
            if len(out) == len(self.return_layers):
                break
        return out
