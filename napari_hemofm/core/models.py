"""Backbone registry and backbone building: what the embedding pipeline calls.

:func:`load_backbone` returns a :class:`Backbone` whose :meth:`~Backbone.prepare` (numpy +
Pillow, thread-safe) turns one crop into a model input and whose
:meth:`~Backbone.forward` turns a batch into embeddings. Where the weights come from and
how a checkpoint file is read (resolution, download, conversion of both released layouts)
is :mod:`napari_hemofm.core.weights`. The facts behind every choice here (checkpoint
layouts, key mapping, preprocessing, the embedding = the CLS token after the final norm)
are in the shared ``docs/dinobloom.md``; the user-facing story is ``docs/models.md``.

No timm model is ever built with ``pretrained=True``. torch and timm are imported inside
functions so that importing this module stays light (STYLE.md 9).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MODEL_NAMES",
    "MODEL_SPECS",
    "Backbone",
    "DeviceError",
    "DinoBloomBackbone",
    "ModelSpec",
    "WeightsError",
    "build_model",
    "create_timm_model",
    "get_spec",
    "load_backbone",
    "prepare_crop",
]

MODEL_NAMES = ("dinobloom-s", "dinobloom-b", "dinobloom-l", "dinobloom-g", "handcrafted")
"""Every model the ``--model`` option and the Embed panel offer, in display order."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    """What the plugin knows about one model before any weights are read.

    Attributes
    ----------
    name : str
        Registry name (``"dinobloom-s"``, ..., ``"handcrafted"``).
    arch : str or None
        timm architecture, built at ``img_size=input_size`` with ``num_classes=0``;
        None for the handcrafted extractor.
    dim : int
        Embedding dimension (for ``handcrafted``: ``len(core.features.FEATURE_NAMES)``,
        checked by a test).
    input_size : int
        Side of the square model input in pixels.
    hub_repo : str or None
        Hugging Face hub repository holding the timm-format ``model.safetensors``.
    zenodo_file : str or None
        File name of the official checkpoint in Zenodo record 10908163.
    depth : int
        Number of transformer blocks.
    display_name : str
        Name as the paper writes it (``"DinoBloom-S"``).
    num_heads : int
        Attention heads (head dim 64).
    n_params : int
        Backbone parameters at 224 px, without ``mask_token``.
    download_size : str
        Size of the hub ``model.safetensors``, for messages.
    """

    name: str
    arch: str | None
    dim: int
    input_size: int
    hub_repo: str | None
    zenodo_file: str | None
    depth: int
    display_name: str
    num_heads: int = 0
    n_params: int = 0
    download_size: str = ""

    @property
    def needs_weights(self) -> bool:
        """True for the DinoBloom models, False for ``handcrafted``."""
        return self.arch is not None

    @property
    def feature_version(self) -> int | None:
        """Version of the handcrafted features, else None.

        :data:`~.features.FEATURE_VERSION` is bumped when the vector changes meaning;
        DinoBloom has none (its weights' sha256 says which embeddings it gives).
        """
        if self.needs_weights:
            return None
        from napari_hemofm.core.features import FEATURE_VERSION

        return FEATURE_VERSION


def _dinobloom_spec(
    letter: str, size: str, dim: int, depth: int, heads: int, n_params: int, mb: str
) -> ModelSpec:
    return ModelSpec(
        name=f"dinobloom-{letter.lower()}",
        arch=f"vit_{size}_patch14_dinov2",
        dim=dim,
        input_size=224,
        hub_repo=f"1aurent/vit_{size}_patch14_224.dinobloom",
        zenodo_file=f"DinoBloom-{letter}.pth",
        depth=depth,
        display_name=f"DinoBloom-{letter}",
        num_heads=heads,
        n_params=n_params,
        download_size=mb,
    )


MODEL_SPECS: dict[str, ModelSpec] = {
    "dinobloom-s": _dinobloom_spec("S", "small", 384, 12, 6, 21_628_800, "86.5 MB"),
    "dinobloom-b": _dinobloom_spec("B", "base", 768, 12, 12, 85_724_928, "343 MB"),
    "dinobloom-l": _dinobloom_spec("L", "large", 1024, 24, 16, 303_227_904, "1.21 GB"),
    "dinobloom-g": _dinobloom_spec("G", "giant", 1536, 40, 24, 1_134_769_664, "4.54 GB"),
    "handcrafted": ModelSpec(
        name="handcrafted",
        arch=None,
        dim=78,
        input_size=256,
        hub_repo=None,
        zenodo_file=None,
        depth=0,
        display_name="handcrafted",
    ),
}


class WeightsError(RuntimeError):
    """Model weights are missing, unreadable or do not fit the chosen model.

    The message is meant for the user as is: what is wrong, which file, what to do.
    The command line prints it without a traceback.
    """


class DeviceError(ValueError):
    """The requested device (``"cuda"``, ...) is not usable with this torch install."""


def get_spec(name: str) -> ModelSpec:
    """Return the :class:`ModelSpec` for a registry name.

    Parameters
    ----------
    name : str
        One of :data:`MODEL_NAMES` (case-insensitive).

    Returns
    -------
    ModelSpec

    Raises
    ------
    ValueError
        For an unknown name; the message lists the known ones.
    """
    spec = MODEL_SPECS.get(str(name).strip().lower())
    if spec is None:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    return spec


# --------------------------------------------------------------------------- preprocessing

_MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32)
_STD = np.asarray(IMAGENET_STD, dtype=np.float32)


def prepare_crop(crop: np.ndarray, size: int = 224) -> np.ndarray:
    """Turn one crop into a DinoBloom input: squash-resize, scale, ImageNet-normalise.

    The same as DinoBloom's ``Resize((size, size)) -> ToTensor() -> Normalize(mean, std)``
    on a PIL RGB image: Pillow's antialiased bilinear resize (what torchvision's
    ``Resize`` calls on PIL input), no crop, aspect ratio not kept. Only numpy and Pillow
    are used, so worker threads may call it concurrently.

    Parameters
    ----------
    crop : ndarray of shape (H, W, 3), (H, W, 4), (H, W, 1) or (H, W), dtype uint8
        One cell, RGB. Grey is replicated to three channels and an alpha channel is
        dropped, as Pillow's ``convert("RGB")`` does.
    size : int, default 224
        Output side in pixels.

    Returns
    -------
    ndarray of shape (3, size, size), float32
        Channels first, ``(x / 255 - mean) / std`` with the ImageNet mean and std.

    Raises
    ------
    ValueError
        If the crop is not uint8, is empty or has an unsupported shape.
    """
    arr = np.asarray(crop)
    if arr.dtype != np.uint8:
        raise ValueError(f"crop must be uint8 RGB, got dtype {arr.dtype}")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[:, :, :3]
    elif not (arr.ndim == 3 and arr.shape[2] == 3):
        raise ValueError(f"crop must have shape (H, W, 3), got {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"crop is empty: shape {arr.shape}")
    img = Image.fromarray(np.ascontiguousarray(arr))
    img = img.resize((size, size), Image.Resampling.BILINEAR)
    x = np.asarray(img).astype(np.float32) / np.float32(255.0)
    x = (x - _MEAN) / _STD
    return np.ascontiguousarray(x.transpose(2, 0, 1))


# --------------------------------------------------------------------------- backbones


class Backbone:
    """A crop-to-vector model as the embedding pipeline sees it.

    Subclasses implement :meth:`prepare` (thread-safe, no torch) and :meth:`forward`.

    Attributes
    ----------
    name : str
        Registry name.
    dim : int
        Embedding dimension.
    input_size : int
        Side of the square input :meth:`prepare` produces.
    weights_sha256 : str or None
        sha256 of the weights file used, None when there is none.
    device : str
        Torch device the model runs on.
    precision : {"fp32", "bf16"}
        Compute precision of :meth:`forward`; its output is float32 either way.
    """

    name: str
    dim: int
    input_size: int
    weights_sha256: str | None = None
    device: str = "cpu"
    precision: str = "fp32"

    def prepare(self, crop: np.ndarray) -> np.ndarray:
        """Turn one (H, W, 3) uint8 crop into a model input (thread-safe)."""
        raise NotImplementedError

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Embed a batch of prepared inputs: (B, ...) -> (B, dim) float32."""
        raise NotImplementedError

    def embed_crops(self, crops: Sequence[np.ndarray], *, batch_size: int = 32) -> np.ndarray:
        """Prepare and embed crops in one call (convenience; the pipeline batches itself).

        Parameters
        ----------
        crops : sequence of ndarray of shape (H, W, 3), uint8
            Cell crops of any size.
        batch_size : int, default 32
            Crops per forward pass.

        Returns
        -------
        ndarray of shape (n_crops, dim), float32
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out = [np.zeros((0, self.dim), dtype=np.float32)]
        for start in range(0, len(crops), batch_size):
            batch = np.stack([self.prepare(c) for c in crops[start : start + batch_size]])
            out.append(self.forward(batch))
        return np.concatenate(out, axis=0)

    def meta(self) -> dict[str, Any]:
        """Provenance for ``adata.uns["hemofm"]``.

        Returns
        -------
        dict
            ``model``, ``weights_sha256``, ``input_size``, ``embedding_dim``, ``precision``.
        """
        return {
            "model": self.name,
            "weights_sha256": self.weights_sha256,
            "input_size": int(self.input_size),
            "embedding_dim": int(self.dim),
            "precision": self.precision,
        }

    def __repr__(self) -> str:
        sha = (self.weights_sha256 or "none")[:12]
        return (
            f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, device={self.device!r}, "
            f"precision={self.precision!r}, weights_sha256={sha}...)"
        )


class DinoBloomBackbone(Backbone):
    """A DinoBloom ViT: the CLS token after the final norm is the embedding.

    Build it with :func:`load_backbone`.

    Parameters
    ----------
    spec : ModelSpec
        The model's registry entry.
    model : torch.nn.Module
        A timm ViT in eval mode on ``device`` with the weights loaded.
    weights_sha256 : str or None
        sha256 of the weights file.
    device : str, default "cpu"
        Device the model is on.
    precision : {"fp32", "bf16"}, default "fp32"
        "bf16" runs the forward under ``torch.autocast(dtype=torch.bfloat16)``.
    weights_path : Path, optional
        The weights file, for messages.
    """

    def __init__(
        self,
        spec: ModelSpec,
        model: torch.nn.Module,
        *,
        weights_sha256: str | None,
        device: str = "cpu",
        precision: Literal["fp32", "bf16"] = "fp32",
        weights_path: Path | None = None,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self.dim = spec.dim
        self.input_size = spec.input_size
        self.weights_sha256 = weights_sha256
        self.weights_path = weights_path
        self.device = str(device)
        self.precision = precision
        self.model = model
        # One forward at a time: concurrent forwards only fight over the same cores.
        self._lock = threading.Lock()

    def prepare(self, crop: np.ndarray) -> np.ndarray:
        """Squash-resize to 224 x 224 (bilinear), scale and ImageNet-normalise one crop.

        Thread-safe (numpy + Pillow only). See :func:`prepare_crop`.

        Parameters
        ----------
        crop : ndarray of shape (H, W, 3), uint8
            One cell, RGB, any size (grey and RGBA are accepted too).

        Returns
        -------
        ndarray of shape (3, 224, 224), float32
        """
        return prepare_crop(crop, self.input_size)

    def forward(self, batch: np.ndarray) -> np.ndarray:
        """Embed a batch of prepared crops.

        Parameters
        ----------
        batch : ndarray of shape (B, 3, 224, 224), float32
            Stacked outputs of :meth:`prepare`.

        Returns
        -------
        ndarray of shape (B, dim), float32
            CLS token after the final LayerNorm, one row per crop.
        """
        import torch

        x = np.asarray(batch, dtype=np.float32)
        expected = (3, self.input_size, self.input_size)
        if x.ndim != 4 or x.shape[1:] != expected:
            raise ValueError(
                f"batch must have shape (B, {', '.join(map(str, expected))}), got {x.shape}"
            )
        if x.shape[0] == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        dev = torch.device(self.device)
        with self._lock, torch.inference_mode():
            t = torch.from_numpy(np.ascontiguousarray(x)).to(dev)
            with torch.autocast(
                device_type=dev.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"
            ):
                out = self.model(t)
            return out.float().cpu().numpy()


def create_timm_model(spec: ModelSpec, depth: int | None, device: str = "meta") -> Any:
    """The spec's timm ViT, untrained (``pretrained=False``), at 224 px, without a head.

    Parameters
    ----------
    spec : ModelSpec
        A DinoBloom spec.
    depth : int or None
        Number of blocks when not ``spec.depth`` (tests build reduced-depth models).
    device : str, default "meta"
        "meta" builds shapes only (no memory), e.g. to check a state dict's names.

    Returns
    -------
    timm.models.vision_transformer.VisionTransformer
    """
    import timm
    import torch

    kwargs: dict[str, Any] = {"pretrained": False, "img_size": spec.input_size, "num_classes": 0}
    if depth is not None:
        kwargs["depth"] = depth
    with torch.device(device):
        return timm.create_model(spec.arch, **kwargs)


def build_model(
    spec: ModelSpec,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    *,
    depth: int | None = None,
) -> torch.nn.Module:
    """Build the timm ViT for a spec and load a state dict strictly.

    Parameters
    ----------
    spec : ModelSpec
        A DinoBloom spec.
    state_dict : mapping of str to torch.Tensor, optional
        Output of :func:`~napari_hemofm.core.weights.load_state_dict`. Without it the
        model keeps timm's random initialisation (tests, benchmarks).
    depth : int, optional
        Build with this many blocks instead of ``spec.depth`` (tests).

    Returns
    -------
    torch.nn.Module
        ``timm.create_model(spec.arch, pretrained=False, img_size=224, num_classes=0)`` in
        eval mode on the CPU; ``model(x)`` is the CLS token after the final norm, (B, dim).

    Raises
    ------
    WeightsError
        If the state dict does not load strictly.
    """
    if spec.arch is None:
        raise ValueError(f"{spec.name} is not a timm model")
    if state_dict is None:
        model = create_timm_model(spec, depth, device="cpu")
    else:
        # Built on the meta device and given the loaded tensors (assign=True): no random
        # initialisation to throw away, and no second copy of the weights in memory.
        model = create_timm_model(spec, depth)
        try:
            model.load_state_dict(dict(state_dict), strict=True, assign=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            raise WeightsError(
                f"Weights do not fit {spec.name} ({spec.arch}): "
                + " ".join(line.strip() for line in first[:4])
            ) from None
    model.requires_grad_(False)
    return model.eval()


# --------------------------------------------------------------------------- load


def _check_device(device: str) -> str:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise DeviceError(f"unknown device {device!r}; use 'cpu' or 'cuda'") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {device!r} was requested but CUDA is not available (this torch "
                f"build {torch.__version__} sees no GPU). Use --device cpu, or install a "
                "CUDA build of torch on a machine with an NVIDIA GPU."
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {device!r} was requested but only {torch.cuda.device_count()} "
                "CUDA device(s) are visible."
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"device {device!r} was requested but MPS is not available.")
    elif dev.type != "cpu":
        raise DeviceError(f"device {device!r} is not supported; use 'cpu' or 'cuda'")
    return str(dev)


def load_backbone(
    name: str,
    *,
    weights: str | Path | None = None,
    download: bool = False,
    device: str = "cpu",
    precision: Literal["fp32", "bf16"] = "fp32",
    progress: Callable[[int, int], None] | None = None,
    _depth: int | None = None,
) -> Backbone:
    """Load a model ready to embed crops.

    Parameters
    ----------
    name : str
        One of :data:`MODEL_NAMES`.
    weights : str or Path, optional
        Explicit weights: a ``.pth``, a ``.safetensors`` or a folder holding
        ``model.safetensors``. Otherwise the cache is searched
        (:func:`~napari_hemofm.core.weights.resolve_weights`).
    download : bool, default False
        Allow downloading missing weights from the Hugging Face hub into the cache.
    device : str, default "cpu"
        Torch device, e.g. ``"cuda"``.
    precision : {"fp32", "bf16"}, default "fp32"
        "bf16" runs the forward under bfloat16 autocast (about 2x faster on CPUs with AMX;
        embeddings move slightly, see ``docs/models.md``). Output is float32 either way.
    progress : callable, optional
        ``progress(bytes_done, bytes_total)`` during a download; raise from it to cancel.
    _depth : int, optional
        Private test hook: build and expect this many blocks.

    Returns
    -------
    Backbone
        A :class:`DinoBloomBackbone`, or ``core.features.HandcraftedBackbone`` for
        ``"handcrafted"``.

    Raises
    ------
    WeightsError
        Weights missing, unreadable or for another model (the message says what to do).
    DeviceError
        The device is not available.
    ValueError
        Unknown model name or precision.
    """
    spec = get_spec(name)
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    if not spec.needs_weights:
        if weights is not None:
            warnings.warn(f"{spec.name} uses no weights; ignoring {weights}", stacklevel=2)
        from napari_hemofm.core.features import HandcraftedBackbone

        return HandcraftedBackbone()
    from napari_hemofm.core.weights import load_state_dict, resolve_weights, sha256_file

    dev = _check_device(device)  # before reading gigabytes of weights
    path = resolve_weights(spec.name, weights, download=download, progress=progress)
    state_dict = load_state_dict(path, spec, depth=_depth)
    model = build_model(spec, state_dict, depth=_depth).to(dev)
    return DinoBloomBackbone(
        spec,
        model,
        weights_sha256=sha256_file(path),
        device=dev,
        precision=precision,
        weights_path=path,
    )
