"""The trainable model: a registry backbone, dropout, and one linear head per task.

A checkpoint holds the state dict plus the `model_config` needed to rebuild it — plain types only,
so it loads with `torch.load(..., weights_only=True)`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgexfer.backbones import build_backbone, get_backbone_info, pooled_taps, preprocessing_for
from edgexfer.errors import RunFolderError
from edgexfer.runtime import atomic
from edgexfer.runtime.metadata import Preprocessing


class EdgeNet(nn.Module):
    """backbone (B, 3, H, W) -> (B, D) -> dropout -> one head per task -> tuple of logits.

    `taps` (block indices of `backbone.blocks`): the features are the concatenated global-average-pooled
    outputs of those blocks (`backbones.pooled_taps`) instead of the backbone's last layer; the probe sets them
    when its cross-validation chooses multi-layer features (`set_taps`). No parameters of their own."""

    def __init__(self, backbone: nn.Module, feature_dim: int, tasks: dict[str, int], dropout: float = 0.2,
                 taps: list[int] | None = None):
        super().__init__()
        self.backbone = backbone
        self.taps = None if taps is None else [int(t) for t in taps]
        self.dropout = nn.Dropout(dropout)
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, n) for name, n in tasks.items()})

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x) if self.taps is None else pooled_taps(self.backbone, x, self.taps)

    def set_taps(self, taps: list[int] | None, feature_dim: int) -> None:
        """Read the pooled outputs of blocks `taps` (None: the last layer), `feature_dim` features in all: every
        head is replaced by a new one of that input width (to be fitted)."""
        self.taps = None if taps is None else [int(t) for t in taps]
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, h.out_features) for name, h in self.heads.items()})

    def classify(self, f: torch.Tensor) -> tuple[torch.Tensor, ...]:
        f = self.dropout(f)
        return tuple(head(f) for head in self.heads.values())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.classify(self.features(x))


def model_config(*, backbone: str, weights: str, image_size: int, tasks: dict[str, list[str]],
                 dropout: float = 0.2) -> dict[str, Any]:
    info = get_backbone_info(backbone)
    pp = preprocessing_for(backbone, image_size)
    return {
        "backbone": backbone,
        "weights": weights,
        "image_size": image_size,
        "feature_dim": info.feature_dim,
        "tasks": {k: list(v) for k, v in tasks.items()},
        "dropout": dropout,
        "preprocessing": {k: (list(v) if isinstance(v, tuple) else v) for k, v in pp.__dict__.items()},
    }


def build_model(cfg: dict[str, Any], *, pretrained: bool = True) -> EdgeNet:
    """Build from a model config; `pretrained=False` skips loading backbone weights (a checkpoint follows)."""
    weights = cfg["weights"] if pretrained else "none"
    backbone = build_backbone(cfg["backbone"], weights=weights, image_size=cfg["image_size"])
    return EdgeNet(backbone, cfg["feature_dim"], {k: len(v) for k, v in cfg["tasks"].items()}, cfg["dropout"],
                   taps=cfg.get("taps"))


def preprocessing_of(cfg: dict[str, Any]) -> Preprocessing:
    return Preprocessing(**cfg["preprocessing"])


def save_checkpoint(path: str | Path, model: EdgeNet, cfg: dict[str, Any], extra: dict | None = None) -> str:
    """Write atomically; return the file's sha256. A model reading multi-layer features (`EdgeNet.taps`) records
    them, and its heads' input width, in the model config."""
    if getattr(model, "taps", None) is not None:
        cfg = {**cfg, "taps": list(model.taps), "feature_dim": next(iter(model.heads.values())).in_features}
    payload = {"model_config": cfg, "state_dict": model.state_dict(), **(extra or {})}
    with atomic.atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return atomic.sha256_file(path)


def load_checkpoint(path: str | Path) -> tuple[EdgeNet, dict[str, Any], dict]:
    path = Path(path)
    if not path.is_file():
        raise RunFolderError(f"checkpoint not found: {path} (run `edgexfer finetune` first)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        cfg = payload["model_config"]
    except Exception as e:
        raise RunFolderError(f"cannot read checkpoint {path}: {e}") from None
    model = build_model(cfg, pretrained=False)
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, cfg, payload

