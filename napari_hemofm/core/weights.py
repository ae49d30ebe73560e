"""Where DinoBloom weights come from and how a checkpoint file is read.

:func:`resolve_weights` finds the weights file of a model (an explicit path, the cache,
or a download from the Hugging Face hub when asked); :func:`load_state_dict` reads either
released layout (the official Zenodo ``.pth`` or the timm-format ``model.safetensors``)
into a checked, timm-named state dict; :func:`sha256_file` fingerprints a weights file
(provenance in ``uns["hemofm"]``, cluster chunk keys). Building the model from the state
dict and the registry of models are :mod:`napari_hemofm.core.models`.

Nothing is downloaded unless asked (``download=True``) and checkpoints are only ever
unpickled with ``weights_only=True``. torch, safetensors, timm and huggingface_hub are
imported inside functions (STYLE.md 9).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from napari_hemofm.core.models import (
    MODEL_SPECS,
    ModelSpec,
    WeightsError,
    create_timm_model,
    get_spec,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "HUB_CONFIG",
    "HUB_FILENAME",
    "WEIGHTS_ENV_VAR",
    "ZENODO_RECORD",
    "load_state_dict",
    "resolve_weights",
    "sha256_file",
    "weights_cache_dir",
]

ZENODO_RECORD = "https://zenodo.org/records/10908163"
"""The official DinoBloom release (``DinoBloom-{S,B,L,G}.pth``)."""

WEIGHTS_ENV_VAR = "HEMOFM_WEIGHTS_DIR"
"""Environment variable that replaces the weights cache folder."""

HUB_FILENAME = "model.safetensors"
HUB_CONFIG = "config.json"

#: DinoBloom checkpoints carry a learned 16x16 grid + CLS (docs/dinobloom.md 1.1).
_POS_TOKENS = 257

_SPEC_BY_DIM = {s.dim: s for s in MODEL_SPECS.values() if s.arch is not None}


# --------------------------------------------------------------------------- where


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


# --------------------------------------------------------------------------- reading

_SHA_CACHE: dict[tuple[str, int, int, int, int], str] = {}
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
        64 hex digits. Remembered in this process per (path, inode, size, mtime,
        ctime), since the big checkpoints take seconds to hash: a file replaced or
        rewritten under the same path changes its inode or ctime (which, unlike mtime,
        cannot be set back), so it is hashed again.
    """
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
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
    """One line: the file is damaged, what the reader said, how to get a good copy."""
    text = str(exc).strip()
    # torch's zip reader explains itself in several sentences: the first one is enough
    detail = text.splitlines()[0].split(". ")[0] if text else type(exc).__name__
    if isinstance(exc, KeyError | IndexError) or len(detail) < 4:
        detail = f"{type(exc).__name__}: {detail}"
    return WeightsError(
        f"Weights file {path} is truncated or corrupt ({detail}). An interrupted download "
        f"leaves such a file: delete it and get it again (--download, or {spec.zenodo_file} "
        f"from {ZENODO_RECORD})."
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
    with open(path, "rb") as fh:
        head = fh.read(16)
    # a zip (torch >= 1.6; a cut one still starts with PK) or a legacy pickle (0x80)
    if head and not (is_zip or head.startswith((b"PK", b"\x80"))):
        raise WeightsError(
            f"Weights file {path} is neither a PyTorch checkpoint nor a safetensors file "
            f"(it starts with {head!r}); pass {spec.zenodo_file} or {HUB_FILENAME}."
        )
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
    except Exception as exc:  # the unpickler fails in many ways on damaged bytes
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
    model = create_timm_model(spec, depth)  # on the meta device: shapes only, no memory
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
