"""open_clip encoders (``open_clip/<arch>/<pretrained>``), the production choice.

``<pretrained>`` is an open_clip pretrained tag, downloaded from the model hub by open_clip on
first use (``open_clip/ViT-B-32/laion2b_s34b_b79k``), or a local checkpoint file
(``open_clip/ViT-B-32//srv/models/vitb32.pt``: the third slash starts the absolute path).
Models come from ``open_clip.create_model_and_transforms`` with its evaluation transform; image
features are ``model.encode_image`` and text features ``model.encode_text`` on tokens from
``open_clip.get_tokenizer(arch)`` (open_clip ``factory.py``). The tag path downloads, so it has
never run on the project's offline machines; the local-file path is tested with a tiny model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from moderation.signals.encoders.base import sha256_file, state_dict_sha256
from moderation.signals.encoders.torch_base import TorchEncoder

logger = logging.getLogger(__name__)

PREFIX = "open_clip/"
# A <pretrained> part with one of these suffixes, or with a path separator, names a file.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt", ".npz")


def parse_open_clip_name(name: str) -> tuple[str, str]:
    """``(arch, pretrained)`` from ``open_clip/<arch>/<pretrained>``, split at the first two "/".

    Raises:
        ValueError: ``name`` does not start with ``open_clip/`` or a part is empty.
    """
    if not name.startswith(PREFIX):
        raise ValueError(f"not an open_clip encoder name: {name!r}")
    arch, _, pretrained = name.removeprefix(PREFIX).partition("/")
    if not arch or not pretrained:
        raise ValueError(
            f"open_clip encoder names are open_clip/<arch>/<pretrained tag or checkpoint file>, "
            f"got {name!r}"
        )
    return arch, pretrained


def _format_floats(values: Any) -> str:
    return "/".join(f"{float(v):.6g}" for v in values)


class OpenClipEncoder(TorchEncoder):
    """An open_clip model's image and text towers (dimension ``embed_dim`` of its config).

    ``weights_sha256`` is the SHA-256 of the checkpoint file for a local file, and for a
    pretrained tag the :func:`~moderation.signals.encoders.base.state_dict_sha256` of the loaded
    model
    (open_clip resolves tags through a download cache whose file layout is not ours to hash), so
    reading :attr:`id` loads a tag's model.

    Raises (on construction):
        ValueError: unknown architecture, or ``pretrained`` is neither a pretrained tag of it
            nor a checkpoint path.
        FileNotFoundError: ``pretrained`` names a checkpoint file that does not exist.
    """

    has_text_tower = True

    def __init__(self, *, name: str, device: torch.device) -> None:
        import open_clip

        arch, pretrained = parse_open_clip_name(name)
        config = open_clip.get_model_config(arch)
        if config is None:
            raise ValueError(
                f"unknown open_clip architecture {arch!r} in {name!r}; "
                "open_clip.list_models() gives the known ones"
            )
        super().__init__(name=name, dim=int(config["embed_dim"]), device=device)
        self.arch = arch
        self.tag: str | None = None
        self.checkpoint: Path | None = None
        if open_clip.is_pretrained_cfg(arch, pretrained):
            self.tag = pretrained
        elif "/" in pretrained or "\\" in pretrained or pretrained.endswith(CHECKPOINT_SUFFIXES):
            path = Path(pretrained).expanduser().resolve()
            if not path.is_file():
                raise FileNotFoundError(
                    f"open_clip checkpoint for {name!r} not found: {path} does not exist "
                    "or is not a file"
                )
            self.checkpoint = path
        else:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(arch)) or "none"
            raise ValueError(
                f"{pretrained!r} is neither an open_clip pretrained tag for {arch} "
                f"(known tags: {tags}) nor a checkpoint file path"
            )
        self._transform: Any = None
        self._tokenizer: Any = None
        self._preprocess_cfg: dict[str, Any] = {}
        self._loaded_digest: str | None = None

    @property
    def preprocessing(self) -> str:
        """From the model's ``preprocess_cfg``; loads the model on first use."""
        self.load()
        cfg = self._preprocess_cfg
        size = cfg.get("size", 224)
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return (
            f"size={height}x{width},resize_mode={cfg.get('resize_mode', 'shortest')},"
            f"interp={cfg.get('interpolation', 'bicubic')},"
            f"mean={_format_floats(cfg['mean'])},std={_format_floats(cfg['std'])},"
            f"fill={cfg.get('fill_color', 0)},features=encode_image"
        )

    def _weights_sha256(self) -> str:
        if self.checkpoint is not None:
            return sha256_file(self.checkpoint)
        self.load()
        if self._loaded_digest is None:
            raise RuntimeError(f"{self.name}: the model loaded without a weights digest")
        return self._loaded_digest

    def _build_model(self) -> torch.nn.Module:
        import open_clip

        pretrained = str(self.checkpoint) if self.checkpoint is not None else self.tag
        model, _, preprocess = open_clip.create_model_and_transforms(
            self.arch, pretrained=pretrained, device="cpu"
        )
        self._transform = preprocess
        self._tokenizer = open_clip.get_tokenizer(self.arch)
        self._preprocess_cfg = dict(model.visual.preprocess_cfg)
        if self.checkpoint is None:
            self._loaded_digest = state_dict_sha256(model.state_dict())
        built: torch.nn.Module = model
        return built

    def _preprocess(self, image: Image.Image) -> torch.Tensor:
        tensor: torch.Tensor = self._transform(image)
        return tensor

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        model: Any = self.load()
        features: torch.Tensor = model.encode_image(batch)
        return features

    def _forward_text(self, prompts: list[str]) -> torch.Tensor:
        model: Any = self.load()
        tokens = self._tokenizer(prompts).to(self.device, non_blocking=True)
        features: torch.Tensor = model.encode_text(tokens)
        return features
