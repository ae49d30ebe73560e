"""Backbone registry, weight resolution and DinoBloom checkpoint conversion.

What the embedding pipeline (``core/embed.py``) calls: :func:`load_backbone` returns a
:class:`Backbone` whose :meth:`~Backbone.prepare` (numpy + Pillow, thread-safe) turns one
crop into a model input and whose :meth:`~Backbone.forward` turns a batch into
embeddings. The facts behind every choice here (checkpoint layouts, key mapping,
preprocessing, the embedding = the CLS token after the final norm) are in the shared
``docs/dinobloom.md``; the user-facing story is ``docs/models.md``.

This module never downloads anything unless asked (``download=True``), never builds a
timm model with ``pretrained=True`` and only ever unpickles with ``weights_only=True``.
torch, timm, safetensors and huggingface_hub are imported inside functions so that
importing it stays light (STYLE.md 9).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import warnings
import zipfile
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
    "WEIGHTS_ENV_VAR",
    "ZENODO_RECORD",
    "Backbone",
    "DeviceError",
    "DinoBloomBackbone",
    "ModelSpec",
    "WeightsError",
    "build_model",
    "get_spec",
    "load_backbone",
    "load_state_dict",
    "prepare_crop",
    "resolve_weights",
    "sha256_file",
    "weights_cache_dir",
]

MODEL_NAMES = ("dinobloom-s", "dinobloom-b", "dinobloom-l", "dinobloom-g", "handcrafted")
"""Every model the ``--model`` option and the Embed panel offer, in display order."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ZENODO_RECORD = "https://zenodo.org/records/10908163"
"""The official DinoBloom release (``DinoBloom-{S,B,L,G}.pth``)."""

WEIGHTS_ENV_VAR = "HEMOFM_WEIGHTS_DIR"
"""Environment variable that replaces the weights cache folder."""

HUB_FILENAME = "model.safetensors"
HUB_CONFIG = "config.json"

#: DinoBloom checkpoints carry a learned 16x16 grid + CLS (docs/dinobloom.md 1.1).
_POS_TOKENS = 257


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
        dim=85,
        input_size=256,
        hub_repo=None,
        zenodo_file=None,
        depth=0,
        display_name="handcrafted",
    ),
}

_SPEC_BY_DIM = {s.dim: s for s in MODEL_SPECS.values() if s.arch is not None}


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


# --------------------------------------------------------------------------- weights: where


def weights_cache_dir() -> Path:
    """Folder where weights are looked for and downloaded to.

    Returns
    -------
    Path
        ``$HEMOFM_WEIGHTS_DIR`` when set, else ``platformdirs.user_cache_dir("napari-hemofm")
        / "weights"``. It may not exist yet.
    """
    env = os.environ.get(WEIGHTS_ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("napari-hemofm", appauthor=False)) / "weights"


def _find_file(folder: Path, filename: str) -> Path | None:
    """``folder / filename``, also when the case differs (a renamed Zenodo download)."""
    exact = folder / filename
    if exact.is_file():
        return exact
    if not folder.is_dir():
        return None
    lower = filename.lower()
    for entry in sorted(folder.iterdir()):
        if entry.name.lower() == lower and entry.is_file():
            return entry
    return None


def _cache_candidates(spec: ModelSpec, cache: Path) -> list[tuple[Path, str]]:
    """(folder, file name) pairs searched in the cache, in order."""
    assert spec.zenodo_file is not None
    return [
        (cache / spec.name, HUB_FILENAME),
        (cache / spec.name, spec.zenodo_file),
        (cache, spec.zenodo_file),
    ]


def _how_to_get(spec: ModelSpec, cache: Path) -> str:
    return (
        f"Get the {spec.display_name} weights in one of these ways:\n"
        f"  - let napari-hemofm download them ({spec.download_size}) from "
        f"https://huggingface.co/{spec.hub_repo}: add --download to the hemofm command, "
        "or use the download button in napari's Embed panel;\n"
        f"  - download {spec.zenodo_file} from Zenodo ({ZENODO_RECORD}) or "
        f"{HUB_FILENAME} from https://huggingface.co/{spec.hub_repo}, then pass it with "
        f"--weights PATH, or put it into {cache / spec.name};\n"
        f"  - set {WEIGHTS_ENV_VAR} to a folder that holds {spec.name}/{HUB_FILENAME} "
        f"or {spec.zenodo_file}."
    )


def _weights_in_folder(folder: Path, spec: ModelSpec) -> Path:
    for filename in (HUB_FILENAME, spec.zenodo_file):
        found = _find_file(folder, filename) if filename else None
        if found is not None:
            return found
    others = sorted(p.name for p in folder.glob("*.safetensors")) + sorted(
        p.name for p in folder.glob("*.pth")
    )
    hint = (
        f" It holds {', '.join(others[:5])}: pass one of them as the file itself."
        if others
        else ""
    )
    raise WeightsError(
        f"No weights for {spec.name} in folder {folder}: expected {HUB_FILENAME} "
        f"(with its config.json) or {spec.zenodo_file}.{hint}"
    )


def resolve_weights(
    name: str,
    weights: str | Path | None = None,
    *,
    download: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Find the weights file for a model.

    Order: the explicit ``weights`` path; the cache (:func:`weights_cache_dir`); a download
    from the Hugging Face hub into the cache, only when ``download`` is True.

    Parameters
    ----------
    name : str
        A DinoBloom model name (``"dinobloom-s"``, ...).
    weights : str or Path, optional
        A ``.pth``, a ``.safetensors``, or a folder holding ``model.safetensors`` (or the
        Zenodo ``DinoBloom-*.pth``). When given it must exist: the cache is not searched.
    download : bool, default False
        Allow a download from the hub when the cache has nothing.
    progress : callable, optional
        ``progress(bytes_done, bytes_total)`` during a download. An exception it raises
        (to cancel) stops the download and propagates unchanged.

    Returns
    -------
    Path
        The weights file.

    Raises
    ------
    WeightsError
        When nothing is found (the message says where to get the weights and how to
        point the plugin at them) or the download fails.

    Notes
    -----
    Cache layout: ``<cache>/<name>/model.safetensors`` (what a download writes), or a
    Zenodo ``DinoBloom-S.pth`` in ``<cache>/<name>/`` or in ``<cache>/`` itself.
    """
    spec = get_spec(name)
    if not spec.needs_weights:
        raise ValueError(f"{spec.name} uses no weights")
    if weights is not None and str(weights).strip() != "":
        path = Path(weights).expanduser()
        if path.is_dir():
            return _weights_in_folder(path, spec)
        if path.is_file():
            return path
        raise WeightsError(
            f"Weights file {path} does not exist.\n{_how_to_get(spec, weights_cache_dir())}"
        )
    cache = weights_cache_dir()
    candidates = _cache_candidates(spec, cache)
    for folder, filename in candidates:
        found = _find_file(folder, filename)
        if found is not None:
            return found
    if download:
        return _download_weights(spec, cache / spec.name, progress)
    looked = "\n".join(f"  {folder / filename}" for folder, filename in candidates)
    raise WeightsError(
        f"No weights found for {spec.name} ({spec.display_name}). Looked in:\n{looked}\n"
        f"{_how_to_get(spec, cache)}"
    )


def _progress_tqdm(
    progress: Callable[[int, int], None] | None, raised: list[BaseException]
) -> type | None:
    """A tqdm class for huggingface_hub that also reports bytes to ``progress``.

    What ``progress`` raises (a cancel request) is kept in ``raised`` so that the caller
    can re-raise it as is instead of reporting a failed download.
    """
    if progress is None:
        return None
    from tqdm.auto import tqdm

    class _ProgressTqdm(tqdm):
        # Bytes are counted here, not read from tqdm's ``n``: a disabled bar stops counting.
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._bytes_done = int(kwargs.get("initial") or 0)

        def update(self, n: float | None = 1) -> bool | None:
            shown = super().update(n)
            self._bytes_done += int(n or 0)
            try:
                progress(self._bytes_done, int(self.total or 0))
            except BaseException as exc:
                raised.append(exc)
                raise
            return shown

    return _ProgressTqdm


def _download_weights(
    spec: ModelSpec, dest: Path, progress: Callable[[int, int], None] | None
) -> Path:
    """Download ``model.safetensors`` and ``config.json`` from the hub into ``dest``."""
    assert spec.hub_repo is not None
    from huggingface_hub import hf_hub_download

    url = f"https://huggingface.co/{spec.hub_repo}"
    raised: list[BaseException] = []
    try:
        dest.mkdir(parents=True, exist_ok=True)
        # The small config first, so that no network fails fast; local_dir downloads
        # go through a temporary file, so an interrupted download leaves no half file.
        hf_hub_download(spec.hub_repo, HUB_CONFIG, local_dir=dest)
        got = hf_hub_download(
            spec.hub_repo,
            HUB_FILENAME,
            local_dir=dest,
            tqdm_class=_progress_tqdm(progress, raised),
        )
    except Exception as exc:
        if raised:  # the caller's progress callback asked to stop: not a failure
            raise raised[0] from None
        raise WeightsError(
            f"Downloading {spec.display_name} weights from {url} failed: "
            f"{type(exc).__name__}: {exc}\n{_how_to_get(spec, dest.parent)}"
        ) from None
    return Path(got)


# --------------------------------------------------------------------------- weights: read

_SHA_CACHE: dict[tuple[str, int, int], str] = {}
_SHA_LOCK = threading.Lock()


def sha256_file(path: str | Path) -> str:
    """sha256 of a file, hex.

    Parameters
    ----------
    path : str or Path
        The file.

    Returns
    -------
    str
        64 hex digits. Remembered per (path, size, mtime) in this process, since the
        big checkpoints take seconds to hash.
    """
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    with _SHA_LOCK:
        if key in _SHA_CACHE:
            return _SHA_CACHE[key]
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    with _SHA_LOCK:
        _SHA_CACHE[key] = digest
    return digest


def _is_safetensors(path: Path) -> bool:
    """Whether to read ``path`` as safetensors: by content, else by its suffix.

    A safetensors file starts with a little-endian u64 header length, then ``{``; a
    torch checkpoint is a zip (or, in the legacy format, a pickle).
    """
    if zipfile.is_zipfile(path):
        return False
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 30:
        return True
    return path.suffix.lower() == ".safetensors"


def _corrupt(path: Path, spec: ModelSpec, exc: BaseException) -> WeightsError:
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return WeightsError(
        f"Weights file {path} is truncated or corrupt ({detail}). An interrupted download "
        "leaves such a file: delete it and get it again.\n"
        + _how_to_get(spec, weights_cache_dir())
    )


def _read_safetensors(path: Path, spec: ModelSpec) -> dict[str, Any]:
    from safetensors.torch import load_file

    try:
        return dict(load_file(str(path), device="cpu"))
    except Exception as exc:
        raise _corrupt(path, spec, exc) from None


def _read_torch(path: Path, spec: ModelSpec) -> Any:
    import pickle

    import torch

    is_zip = zipfile.is_zipfile(path)
    try:
        with warnings.catch_warnings():
            # "Detected pickle protocol N": the file is refused or loaded anyway.
            warnings.simplefilter("ignore", UserWarning)
            # mmap (zip format only): tensors are paged in from the file, not copied first,
            # and the heads of the official file are never read.
            return torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        msg = str(exc)
        found = re.findall(r"GLOBAL ([\w.]+)", msg)
        if found or "Unsupported" in msg:
            what = (
                f"holds Python objects other than tensors (it references {found[0]})"
                if found
                else "uses pickle features that torch's safe loader does not accept"
            )
            raise WeightsError(
                f"Weights file {path} {what} and is refused for safety: unpickling it "
                "could run arbitrary code. napari-hemofm "
                "only reads checkpoints with weights_only=True. Use the official "
                f"{spec.zenodo_file} from {ZENODO_RECORD} or {HUB_FILENAME} from "
                f"https://huggingface.co/{spec.hub_repo}; if this is your own file, re-save "
                "it as a plain state dict (torch.save(model.state_dict(), path)) or as "
                "safetensors."
            ) from None
        raise _corrupt(path, spec, exc) from None
    except (EOFError, OSError, RuntimeError, ValueError, zipfile.BadZipFile) as exc:
        raise _corrupt(path, spec, exc) from None


def _unwrap(obj: Any, path: Path) -> Mapping[str, Any]:
    """The backbone's own keys, whatever the wrapping; DINO/iBOT heads dropped."""
    if not isinstance(obj, Mapping):
        raise WeightsError(
            f"Weights file {path} holds a {type(obj).__name__}, not a state dict "
            "(a mapping of parameter names to tensors)."
        )
    sd: Mapping[str, Any] = obj
    # Official .pth: {"teacher": {...}}; a DINOv2 training checkpoint: {"model": {...}}.
    for _ in range(3):
        for wrapper in ("teacher", "model", "state_dict"):
            inner = sd.get(wrapper)
            if isinstance(inner, Mapping):
                sd = inner
                break
        else:
            break
    prefixes = [str(k)[: -len("cls_token")] for k in sd if str(k).endswith("cls_token")]
    if not prefixes:
        keys = ", ".join(list(map(str, sd))[:5]) or "none"
        raise WeightsError(
            f"Weights file {path} is not a DINOv2 / DinoBloom ViT checkpoint: it has no "
            f"cls_token (keys start with: {keys})."
        )
    # Prefer the EMA teacher (what DinoBloom released) when a file holds both networks.
    prefix = min(prefixes, key=lambda p: ("teacher" not in p, len(p)))
    out = {}
    for key, value in sd.items():
        key = str(key)
        if not key.startswith(prefix) or "dino_head" in key or "ibot_head" in key:
            continue
        out[key[len(prefix) :]] = value
    return out


def _size_hint(dim: int) -> str:
    other = _SPEC_BY_DIM.get(dim)
    return f"{other.display_name} weights (dim {dim})" if other else f"weights of dim {dim}"


def _check_config(path: Path, spec: ModelSpec) -> None:
    """A timm config.json beside the file must name the same architecture."""
    config = path.parent / HUB_CONFIG
    if path.suffix.lower() != ".safetensors" or not config.is_file():
        return
    try:
        arch = json.loads(config.read_text(encoding="utf-8")).get("architecture")
    except (OSError, ValueError, AttributeError):
        return  # the weights themselves are checked below; a bad config is not fatal
    if isinstance(arch, str) and arch != spec.arch:
        other = next((s for s in MODEL_SPECS.values() if s.arch == arch), None)
        looks = f"{other.display_name} weights (dim {other.dim})" if other else "other weights"
        raise WeightsError(
            f"Weights file {path} does not fit {spec.name}: its {config.name} says {arch}, "
            f"so this looks like {looks}, but {spec.name} needs {spec.arch} (dim {spec.dim}). "
            "Choose the model that matches the file, or the right file."
        )


def _check_shapes(sd: Mapping[str, Any], spec: ModelSpec, path: Path, depth: int) -> None:
    """Clear messages for the usual mistakes, before timm's own checks."""
    import torch

    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"Weights file {path}: entries {bad[:5]} are not tensors.")
    dim = int(sd["cls_token"].shape[-1])
    if dim != spec.dim:
        raise WeightsError(
            f"Weights file {path} does not fit {spec.name}: this looks like "
            f"{_size_hint(dim)} but {spec.name} needs {spec.dim}. Choose the model that "
            "matches the file, or the right file."
        )
    pos = sd.get("pos_embed")
    if pos is not None and pos.ndim == 3 and pos.shape[1] != _POS_TOKENS:
        grid = round((pos.shape[1] - 1) ** 0.5)
        raise WeightsError(
            f"Weights file {path}: pos_embed has {pos.shape[1]} tokens ({grid}x{grid} grid + "
            f"CLS), DinoBloom has {_POS_TOKENS} (16x16 + CLS at 224 px). These look like the "
            "original DINOv2 weights, not DinoBloom; use the DinoBloom checkpoint."
        )
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    n_blocks = max(blocks) + 1 if blocks else 0
    if n_blocks != depth:
        raise WeightsError(
            f"Weights file {path} has {n_blocks} transformer blocks but {spec.name} has "
            f"{depth}; the file is incomplete or for another model."
        )


def _create_timm_model(spec: ModelSpec, depth: int | None, device: str = "meta") -> Any:
    import timm
    import torch

    kwargs: dict[str, Any] = {"pretrained": False, "img_size": spec.input_size, "num_classes": 0}
    if depth is not None:
        kwargs["depth"] = depth
    with torch.device(device):
        return timm.create_model(spec.arch, **kwargs)


def load_state_dict(
    path: str | Path, spec: ModelSpec, *, depth: int | None = None
) -> dict[str, torch.Tensor]:
    """Read either released layout into a timm-named float32 state dict.

    Parameters
    ----------
    path : str or Path
        The official ``.pth`` (``{"teacher": {"backbone.*", "dino_head.*", "ibot_head.*"}}``)
        or the timm-format ``model.safetensors`` (a ``config.json`` beside it is checked
        when present).
    spec : ModelSpec
        The model the weights are for.
    depth : int, optional
        Expected number of blocks when not ``spec.depth`` (tests build reduced-depth models).

    Returns
    -------
    dict of str to torch.Tensor
        Keys as in timm's ``VisionTransformer`` (``mask_token`` dropped, G's ``w12`` / ``w3``
        renamed ``fc1`` / ``fc2`` by ``checkpoint_filter_fn``), values float32, checked
        against the model's names and shapes.

    Raises
    ------
    WeightsError
        For a missing, truncated or corrupt file, a pickle that would run code, or weights
        that do not fit the model (another size, missing or unexpected keys).
    """
    import torch
    from timm.models.vision_transformer import checkpoint_filter_fn

    if spec.arch is None:
        raise ValueError(f"{spec.name} uses no weights")
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"Weights file {path} does not exist.")
    depth = spec.depth if depth is None else int(depth)
    _check_config(path, spec)
    raw = _read_safetensors(path, spec) if _is_safetensors(path) else _read_torch(path, spec)
    sd = _unwrap(raw, path)
    _check_shapes(sd, spec, path, depth)
    sd = {k: v.float() for k, v in sd.items()}
    # checkpoint_filter_fn converts DINOv2 names only when it sees mask_token; a .pth
    # saved without it still needs G's w12/w3 renamed.
    if "mask_token" not in sd and any(".mlp.w12." in k for k in sd):
        sd["mask_token"] = torch.zeros(1, spec.dim)
    model = _create_timm_model(spec, depth)  # on the meta device: shapes only, no memory
    sd = checkpoint_filter_fn(sd, model)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [
        f"{k} {tuple(sd[k].shape)} (needs {expected[k]})"
        for k in expected
        if k in sd and tuple(sd[k].shape) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys, e.g. {', '.join(missing[:4])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys, e.g. {', '.join(unexpected[:4])}")
    if wrong:
        problems.append(f"{len(wrong)} shape mismatches, e.g. {'; '.join(wrong[:3])}")
    if problems:
        raise WeightsError(
            f"Weights file {path} does not fit {spec.name} ({spec.arch}): "
            + "; ".join(problems)
            + "."
        )
    return sd


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
        Output of :func:`load_state_dict`. Without it the model keeps timm's random
        initialisation (tests, benchmarks).
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
        model = _create_timm_model(spec, depth, device="cpu")
    else:
        # Built on the meta device and given the loaded tensors (assign=True): no random
        # initialisation to throw away, and no second copy of the weights in memory.
        model = _create_timm_model(spec, depth)
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
        ``model.safetensors``. Otherwise the cache is searched (:func:`resolve_weights`).
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
