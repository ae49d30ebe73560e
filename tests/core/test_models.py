"""Backbone registry (core/models.py), weight resolution and checkpoint loading (core/weights.py).

The real weights cannot be downloaded here, so the tests write random weights in both
released layouts (shapes from the shared docs/dinobloom.md, not from our code): the
official Zenodo ``.pth`` ``{"teacher": {"backbone.*", "dino_head.*", "ibot_head.*"}}`` with
DINOv2 key names, and the timm-format ``model.safetensors`` (+ config.json). The oracle is
an independent timm model built here with ``timm.create_model`` +
``checkpoint_filter_fn``, fed by torchvision's DinoBloom transform. Nothing touches the
network: ``huggingface_hub.hf_hub_download`` is replaced for every test.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from timm.models.vision_transformer import checkpoint_filter_fn

from napari_hemofm.core import models
from napari_hemofm.core.models import (
    MODEL_NAMES,
    MODEL_SPECS,
    DeviceError,
    WeightsError,
    build_model,
    load_backbone,
    prepare_crop,
)
from napari_hemofm.core.weights import (
    load_state_dict,
    resolve_weights,
    sha256_file,
    weights_cache_dir,
)

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

# From docs/dinobloom.md 1.1: embed dim, depth, FFN hidden (G: SwiGLU, w12 = 2 x hidden).
LAYOUT = {
    "dinobloom-s": (384, 12, 1536, False),
    "dinobloom-b": (768, 12, 3072, False),
    "dinobloom-l": (1024, 24, 4096, False),
    "dinobloom-g": (1536, 40, 4096, True),
}
REDUCED_DEPTH = 2


# --------------------------------------------------------------------------- helpers


def make_teacher(name: str, depth: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random official-layout checkpoint content (the ``teacher`` dict), DINOv2 names."""
    dim, _, hidden, swiglu = LAYOUT[name]
    g = torch.Generator().manual_seed(seed)

    def w(*shape, fan_in=None, scale=None):
        s = scale if scale is not None else (fan_in or shape[-1]) ** -0.5
        return torch.randn(*shape, generator=g) * s

    bb = {
        "cls_token": w(1, 1, dim, scale=1.0),
        "pos_embed": w(1, 257, dim, scale=0.1),
        "mask_token": w(1, dim, scale=1.0),
        "patch_embed.proj.weight": w(dim, 3, 14, 14, fan_in=3 * 14 * 14),
        "patch_embed.proj.bias": w(dim, scale=0.02),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        bb[p + "norm1.weight"] = 1 + w(dim, scale=0.1)
        bb[p + "norm1.bias"] = w(dim, scale=0.02)
        bb[p + "attn.qkv.weight"] = w(3 * dim, dim)
        bb[p + "attn.qkv.bias"] = w(3 * dim, scale=0.02)
        bb[p + "attn.proj.weight"] = w(dim, dim)
        bb[p + "attn.proj.bias"] = w(dim, scale=0.02)
        bb[p + "ls1.gamma"] = 0.3 + w(dim, scale=0.1)
        bb[p + "norm2.weight"] = 1 + w(dim, scale=0.1)
        bb[p + "norm2.bias"] = w(dim, scale=0.02)
        if swiglu:
            bb[p + "mlp.w12.weight"] = w(2 * hidden, dim)
            bb[p + "mlp.w12.bias"] = w(2 * hidden, scale=0.02)
            bb[p + "mlp.w3.weight"] = w(dim, hidden)
            bb[p + "mlp.w3.bias"] = w(dim, scale=0.02)
        else:
            bb[p + "mlp.fc1.weight"] = w(hidden, dim)
            bb[p + "mlp.fc1.bias"] = w(hidden, scale=0.02)
            bb[p + "mlp.fc2.weight"] = w(dim, hidden)
            bb[p + "mlp.fc2.bias"] = w(dim, scale=0.02)
        bb[p + "ls2.gamma"] = 0.3 + w(dim, scale=0.1)
    bb["norm.weight"] = 1 + w(dim, scale=0.1)
    bb["norm.bias"] = w(dim, scale=0.02)
    teacher = {f"backbone.{k}": v for k, v in bb.items()}
    for head in ("dino_head", "ibot_head"):  # small stand-ins for the heads (dropped)
        teacher[f"{head}.mlp.0.weight"] = w(32, dim)
        teacher[f"{head}.mlp.0.bias"] = w(32)
        teacher[f"{head}.mlp.2.weight"] = w(32, 32)
        teacher[f"{head}.mlp.2.bias"] = w(32)
        teacher[f"{head}.mlp.4.weight"] = w(16, 32)
        teacher[f"{head}.mlp.4.bias"] = w(16)
        teacher[f"{head}.last_layer.weight_g"] = w(64, 1)
        teacher[f"{head}.last_layer.weight_v"] = w(64, 16)
    return teacher


def reference_model(name: str, teacher: dict, depth: int) -> torch.nn.Module:
    """The recipe of docs/dinobloom.md section 5, written independently of core/models.py."""
    sd = {
        k.removeprefix("backbone."): v.float()
        for k, v in teacher.items()
        if "dino_head" not in k and "ibot_head" not in k
    }
    model = timm.create_model(
        MODEL_SPECS[name].arch, pretrained=False, img_size=224, num_classes=0, depth=depth
    )
    model.load_state_dict(checkpoint_filter_fn(sd, model), strict=True)
    return model.eval()


def torchvision_batch(crops) -> torch.Tensor:
    """DinoBloom's own transform: Resize((224, 224)) -> ToTensor -> Normalize, on PIL RGB."""
    import torchvision.transforms as tv
    from PIL import Image

    tf = tv.Compose([tv.Resize((224, 224)), tv.ToTensor(), tv.Normalize(MEAN, STD)])
    return torch.stack([tf(Image.fromarray(c).convert("RGB")) for c in crops])


def reference_embed(model: torch.nn.Module, crops) -> np.ndarray:
    with torch.inference_mode():
        return model(torchvision_batch(crops)).numpy()


def make_crops(n: int = 3, seed: int = 1) -> list[np.ndarray]:
    """Cell-like crops of assorted, non-square sizes."""
    rng = np.random.default_rng(seed)
    sizes = [(97, 131), (224, 224), (301, 250), (60, 45)]
    crops = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        yy, xx = np.mgrid[:h, :w]
        blob = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 3) ** 2)[..., None]
        base = rng.integers(150, 240, size=(h, w, 3))
        crops.append(np.where(blob, base - 120, base).astype(np.uint8))
    return crops


def write_pth(teacher: dict, path: Path) -> Path:
    torch.save({"teacher": teacher}, path)
    return path


def write_timm_folder(
    name: str, model: torch.nn.Module, folder: Path, config: bool = True
) -> Path:
    """What the 1aurent hub repos hold: timm-named backbone-only safetensors + config."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors"
    )
    if config:
        cfg = {
            "architecture": MODEL_SPECS[name].arch,
            "num_classes": 0,
            "num_features": MODEL_SPECS[name].dim,
            "global_pool": "token",
            "pretrained_cfg": {
                "input_size": [3, 224, 224],
                "fixed_input_size": True,
                "interpolation": "bicubic",
                "crop_pct": 1.0,
                "mean": list(MEAN),
                "std": list(STD),
                "num_classes": 0,
            },
        }
        (folder / "config.json").write_text(json.dumps(cfg))
    return folder / "model.safetensors"


def truncate(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    """No test may reach the network or the user's real cache."""
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError(f"hf_hub_download called: {args} {kwargs}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HEMOFM_WEIGHTS_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def crops():
    return make_crops(3)


@pytest.fixture(scope="module")
def s_full(tmp_path_factory, crops):
    """DinoBloom-S at full depth in both layouts, with the oracle's embeddings."""
    root = tmp_path_factory.mktemp("s_full")
    teacher = make_teacher("dinobloom-s", 12, seed=0)
    ref = reference_model("dinobloom-s", teacher, 12)
    return {
        "pth": write_pth(teacher, root / "DinoBloom-S.pth"),
        "st": write_timm_folder("dinobloom-s", ref, root / "hub"),
        "expected": reference_embed(ref, crops),
        "root": root,
    }


@pytest.fixture(scope="module")
def s_small(tmp_path_factory):
    """DinoBloom-S at depth 2 (for error cases, where only the layout matters)."""
    root = tmp_path_factory.mktemp("s_small")
    teacher = make_teacher("dinobloom-s", REDUCED_DEPTH, seed=3)
    ref = reference_model("dinobloom-s", teacher, REDUCED_DEPTH)
    crops = make_crops(2, seed=13)
    return {
        "teacher": teacher,
        "pth": write_pth(teacher, root / "DinoBloom-S.pth"),
        "st": write_timm_folder("dinobloom-s", ref, root / "hub"),
        "crops": crops,
        "expected": reference_embed(ref, crops),
        "root": root,
    }


# --------------------------------------------------------------------------- registry


def test_registry_matches_the_facts():
    """Names, archs, dims, depths, input size and hosting as docs/dinobloom.md lists them."""
    assert MODEL_NAMES == (
        "dinobloom-s",
        "dinobloom-b",
        "dinobloom-l",
        "dinobloom-g",
        "handcrafted",
    )
    assert set(MODEL_SPECS) == set(MODEL_NAMES)
    for name, size, letter in [
        ("dinobloom-s", "small", "S"),
        ("dinobloom-b", "base", "B"),
        ("dinobloom-l", "large", "L"),
        ("dinobloom-g", "giant", "G"),
    ]:
        spec = MODEL_SPECS[name]
        assert spec.name == name
        assert spec.arch == f"vit_{size}_patch14_dinov2"
        assert (spec.dim, spec.depth) == LAYOUT[name][:2]
        assert spec.input_size == 224
        assert spec.hub_repo == f"1aurent/vit_{size}_patch14_224.dinobloom"
        assert spec.zenodo_file == f"DinoBloom-{letter}.pth"
    hc = MODEL_SPECS["handcrafted"]
    assert hc.arch is None
    assert hc.hub_repo is None
    assert hc.zenodo_file is None
    with pytest.raises(ValueError, match="dinobloom-s"):
        models.get_spec("dinobloom-xl")


@pytest.mark.parametrize("name", ["dinobloom-s", "dinobloom-g"])
def test_meta_device_model_has_the_documented_parameter_count(name):
    """timm at img_size=224 gives exactly the backbone sizes of docs/dinobloom.md."""
    spec = MODEL_SPECS[name]
    with torch.device("meta"):
        m = timm.create_model(spec.arch, pretrained=False, img_size=224, num_classes=0)
    assert sum(p.numel() for p in m.parameters()) == spec.n_params
    assert tuple(m.pos_embed.shape) == (1, 257, spec.dim)


def test_importing_models_stays_light():
    """Importing core.models and core.weights loads none of torch, timm, safetensors, hub."""
    code = (
        "import sys, napari_hemofm.core.models, napari_hemofm.core.weights\n"
        "heavy = ('torch', 'timm', 'safetensors', 'huggingface_hub')\n"
        "print(','.join(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == ""


# --------------------------------------------------------------------------- preprocessing


def test_prepare_equals_torchvision_dinobloom_transform():
    """prepare_crop == Compose([Resize((224, 224)), ToTensor(), Normalize(ImageNet)]) on the
    PIL image, for upsampled, downsampled, square and non-square crops.

    Both sides do the same float32 operations on the same Pillow resize, so the tolerance
    (1e-6) only allows for a different order of the two float32 steps."""
    rng = np.random.default_rng(0)
    crops = [
        rng.integers(0, 256, size=s, dtype=np.uint8)
        for s in [(37, 53, 3), (224, 224, 3), (513, 260, 3), (1, 1, 3), (224, 97, 3)]
    ]
    expected = torchvision_batch(crops).numpy()
    got = np.stack([prepare_crop(c) for c in crops])
    assert got.dtype == np.float32
    assert got.shape == (5, 3, 224, 224)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_prepare_grey_rgba_and_bad_input():
    """Grey (2-D or one channel) is replicated, alpha dropped (PIL convert("RGB"));
    non-uint8 or empty crops are refused."""
    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, size=(31, 77), dtype=np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    out = prepare_crop(grey)
    assert out.shape == (3, 224, 224)
    np.testing.assert_array_equal(out, prepare_crop(grey[..., None]))
    np.testing.assert_array_equal(out, prepare_crop(rgb))
    rgba = np.dstack([rgb, rng.integers(0, 256, size=(31, 77), dtype=np.uint8)])
    np.testing.assert_array_equal(prepare_crop(rgba), out)
    # ImageNet normalisation of pure black / white
    black = prepare_crop(np.zeros((5, 9, 3), np.uint8))
    np.testing.assert_allclose(black[:, 0, 0], -np.array(MEAN) / np.array(STD), rtol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        prepare_crop(rgb.astype(np.float32))
    with pytest.raises(ValueError, match="empty"):
        prepare_crop(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(ValueError, match="shape"):
        prepare_crop(np.zeros((4, 4, 2), np.uint8))


def test_prepare_is_thread_safe():
    """prepare_crop from 8 threads at once gives the same arrays as serial calls."""
    crops = make_crops(4, seed=5) * 4
    serial = [prepare_crop(c) for c in crops]
    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(prepare_crop, crops))
    for a, b in zip(serial, threaded, strict=True):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- embeddings


def test_s_official_pth_matches_reference(s_full, crops):
    """Full-depth DinoBloom-S from the Zenodo layout embeds like the oracle (1e-5)."""
    bb = load_backbone("dinobloom-s", weights=s_full["pth"])
    got = bb.embed_crops(crops, batch_size=2)
    assert got.dtype == np.float32
    assert got.shape == (len(crops), 384)
    np.testing.assert_allclose(got, s_full["expected"], rtol=0, atol=1e-5)
    meta = bb.meta()
    assert meta == {
        "model": "dinobloom-s",
        "weights_sha256": sha256_file(s_full["pth"]),
        "input_size": 224,
        "embedding_dim": 384,
        "precision": "fp32",
    }
    assert (
        bb.weights_sha256 == __import__("hashlib").sha256(s_full["pth"].read_bytes()).hexdigest()
    )
    assert (bb.name, bb.dim, bb.input_size, bb.device) == ("dinobloom-s", 384, 224, "cpu")
    # prepare + forward is what embed_crops does
    batch = np.stack([bb.prepare(c) for c in crops])
    np.testing.assert_array_equal(bb.forward(batch), got)
    assert bb.forward(np.zeros((0, 3, 224, 224), np.float32)).shape == (0, 384)
    assert bb.embed_crops([]).shape == (0, 384)
    with pytest.raises(ValueError, match="shape"):
        bb.forward(np.zeros((2, 3, 100, 100), np.float32))


def test_s_timm_safetensors_matches_reference(s_full, crops):
    """Full-depth DinoBloom-S from the hub layout embeds like the oracle and records the
    safetensors' sha256."""
    st = s_full["st"]
    bb = load_backbone("dinobloom-s", weights=st)
    np.testing.assert_allclose(bb.embed_crops(crops), s_full["expected"], rtol=0, atol=1e-5)
    assert bb.meta()["weights_sha256"] == sha256_file(st)


@pytest.mark.parametrize("how", ["folder", "folder-no-config", "cache"])
def test_safetensors_folder_with_or_without_config(s_small, how, tmp_path):
    """A folder holding model.safetensors (+ config.json, or without it), or the cache's
    <cache>/dinobloom-s/ folder, loads the hub layout."""
    st = s_small["st"]
    if how == "folder":
        weights = st.parent
    else:
        weights = tmp_path / ("cache/dinobloom-s" if how == "cache" else "bare")
        weights.mkdir(parents=True)
        (weights / "model.safetensors").symlink_to(st)
    bb = load_backbone(
        "dinobloom-s", weights=None if how == "cache" else weights, _depth=REDUCED_DEPTH
    )
    np.testing.assert_allclose(
        bb.embed_crops(s_small["crops"]), s_small["expected"], rtol=0, atol=1e-5
    )
    assert bb.meta()["weights_sha256"] == sha256_file(st)


def test_both_layouts_give_the_same_state_dict(s_small):
    """load_state_dict: the .pth and the safetensors give identical timm-named float32
    tensors; mask_token and heads are gone."""
    spec = MODEL_SPECS["dinobloom-s"]
    a = load_state_dict(s_small["pth"], spec, depth=REDUCED_DEPTH)
    b = load_state_dict(s_small["st"], spec, depth=REDUCED_DEPTH)
    assert a.keys() == b.keys()
    assert "mask_token" not in a
    assert not any("head" in k for k in a)
    for k in a:
        assert a[k].dtype == torch.float32
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.fixture(scope="module", params=["dinobloom-b", "dinobloom-l", "dinobloom-g"])
def reduced(request, tmp_path_factory):
    """B, L, G at depth 2 in both layouts: the layout, not the size, is under test."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    teacher = make_teacher(name, REDUCED_DEPTH, seed=7)
    ref = reference_model(name, teacher, REDUCED_DEPTH)
    crops = make_crops(2, seed=11)
    out = {
        "name": name,
        "crops": crops,
        "pth": write_pth(teacher, root / MODEL_SPECS[name].zenodo_file),
        "st": write_timm_folder(name, ref, root / "hub"),
        "expected": reference_embed(ref, crops),
    }
    del ref, teacher
    return out


@pytest.mark.parametrize("layout", ["pth", "st"])
def test_reduced_depth_layouts_match_reference(reduced, layout):
    """B / L / G (G with SwiGLU w12/w3 renamed to fc1/fc2) load from both layouts and embed
    like the oracle within 1e-5."""
    name = reduced["name"]
    bb = load_backbone(name, weights=reduced[layout], _depth=REDUCED_DEPTH)
    got = bb.embed_crops(reduced["crops"])
    assert got.shape == (2, MODEL_SPECS[name].dim)
    np.testing.assert_allclose(got, reduced["expected"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("wrap", ["plain-dinov2", "plain-timm", "training-checkpoint"])
def test_other_wrappings_of_the_same_backbone(s_small, tmp_path, wrap):
    """A bare backbone state dict (DINOv2 or timm names) and a DINOv2 training checkpoint
    {"model": {"student.backbone.*", "teacher.backbone.*"}} (teacher taken) all give the
    state dict of the official file."""
    spec = MODEL_SPECS["dinobloom-s"]
    teacher = s_small["teacher"]
    expected = load_state_dict(s_small["pth"], spec, depth=REDUCED_DEPTH)
    bb = {k.removeprefix("backbone."): v for k, v in teacher.items() if "backbone." in k}
    if wrap == "plain-dinov2":
        obj = bb
    elif wrap == "plain-timm":
        obj = dict(expected)
    else:
        obj = {
            "model": {
                **{f"student.backbone.{k}": torch.zeros_like(v) for k, v in bb.items()},
                **{f"teacher.{k}": v for k, v in teacher.items()},
            },
            "iteration": 1000,
        }
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    got = load_state_dict(path, spec, depth=REDUCED_DEPTH)
    assert got.keys() == expected.keys()
    for k in got:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0)


def test_g_state_dict_uses_timm_names(tmp_path):
    """The giant's DINOv2 `mlp.w12` / `mlp.w3` become timm's `mlp.fc1` / `mlp.fc2`, also for
    a .pth saved without mask_token (checkpoint_filter_fn only converts when it sees one)."""
    teacher = make_teacher("dinobloom-g", 1, seed=2)
    del teacher["backbone.mask_token"]
    path = write_pth(teacher, tmp_path / "g.pth")
    sd = load_state_dict(path, MODEL_SPECS["dinobloom-g"], depth=1)
    assert tuple(sd["blocks.0.mlp.fc1.weight"].shape) == (8192, 1536)
    assert tuple(sd["blocks.0.mlp.fc2.weight"].shape) == (1536, 4096)
    assert not any("w12" in k or "w3" in k for k in sd)


def test_half_precision_checkpoint_is_cast_to_float32(s_small, tmp_path):
    teacher = {k: v.half() for k, v in s_small["teacher"].items()}
    path = write_pth(teacher, tmp_path / "half.pth")
    sd = load_state_dict(path, MODEL_SPECS["dinobloom-s"], depth=REDUCED_DEPTH)
    assert {v.dtype for v in sd.values()} == {torch.float32}


def test_build_model_without_weights_and_strict_load():
    spec = MODEL_SPECS["dinobloom-s"]
    model = build_model(spec, depth=1)
    assert not model.training
    with torch.inference_mode():
        assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 384)
    sd = dict(model.state_dict())
    sd.pop("norm.bias")
    with pytest.raises(WeightsError, match=r"norm\.bias"):
        build_model(spec, sd, depth=1)


def test_bf16_runs_and_stays_close(s_small, crops):
    """bf16 autocast: float32 output, cosine similarity to fp32 > 0.99 for every crop."""
    fp32 = load_backbone("dinobloom-s", weights=s_small["pth"], _depth=REDUCED_DEPTH)
    bf16 = load_backbone(
        "dinobloom-s", weights=s_small["pth"], _depth=REDUCED_DEPTH, precision="bf16"
    )
    a, b = fp32.embed_crops(crops), bf16.embed_crops(crops)
    assert b.dtype == np.float32
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99, cos
    assert bf16.meta()["precision"] == "bf16"
    with pytest.raises(ValueError, match="precision"):
        load_backbone("dinobloom-s", weights=s_small["pth"], precision="fp16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_unavailable_is_a_clear_error(s_small):
    with pytest.raises(DeviceError, match="CUDA is not available"):
        load_backbone("dinobloom-s", weights=s_small["pth"], device="cuda")
    with pytest.raises(DeviceError, match="unknown device"):
        load_backbone("dinobloom-s", weights=s_small["pth"], device="gpu0")


def test_handcrafted_needs_no_weights():
    from napari_hemofm.core import features

    bb = load_backbone("handcrafted")
    assert isinstance(bb, features.HandcraftedBackbone)
    assert bb.meta()["model"] == "handcrafted"
    spec = MODEL_SPECS["handcrafted"]
    assert (spec.dim, spec.input_size) == (bb.dim, bb.input_size)
    assert spec.dim == len(features.FEATURE_NAMES)


# --------------------------------------------------------------------------- bad files


def test_other_size_is_named(s_small):
    """An S checkpoint given for dinobloom-b says what it looks like and what is needed."""
    for path in (s_small["pth"], s_small["st"].parent):
        with pytest.raises(WeightsError) as info:
            load_backbone("dinobloom-b", weights=path, _depth=REDUCED_DEPTH)
        msg = str(info.value)
        for needle in ("DinoBloom-S", "384", "768", "dinobloom-b", str(path)):
            assert needle in msg


def test_config_json_of_another_size_is_named(s_small, tmp_path):
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(s_small["st"].read_bytes())
    cfg = {"architecture": "vit_small_patch14_dinov2"}
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match=r"DinoBloom-S.*dinobloom-l needs vit_large"):
        load_backbone("dinobloom-l", weights=folder)


@pytest.mark.parametrize("layout", ["pth", "st"])
def test_truncated_file_is_refused(s_small, layout, tmp_path):
    src = s_small[layout]
    bad = truncate(src, tmp_path / f"cut{src.suffix}")
    with pytest.raises(WeightsError, match="truncated or corrupt") as info:
        load_backbone("dinobloom-s", weights=bad, _depth=REDUCED_DEPTH)
    assert str(bad) in str(info.value)
    empty = tmp_path / f"empty{src.suffix}"
    empty.write_bytes(b"")
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        load_state_dict(empty, MODEL_SPECS["dinobloom-s"])


def test_legacy_torch_format_loads_and_truncated_is_refused(s_small, tmp_path):
    """Old non-zip torch.save files load too (no mmap); cut in half they are refused."""
    path = tmp_path / "legacy.pth"
    torch.save({"teacher": s_small["teacher"]}, path, _use_new_zipfile_serialization=False)
    sd = load_state_dict(path, MODEL_SPECS["dinobloom-s"], depth=REDUCED_DEPTH)
    assert "blocks.1.mlp.fc2.weight" in sd
    bad = truncate(path, tmp_path / "legacy_cut.pth")
    with pytest.raises(WeightsError, match="truncated or corrupt"):
        load_state_dict(bad, MODEL_SPECS["dinobloom-s"], depth=REDUCED_DEPTH)


class _RunsCode:
    """Unpickling this would run a shell command (what a malicious checkpoint does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickle_that_runs_code_is_refused_and_not_run(tmp_path, writer):
    marker = tmp_path / "PWNED"
    path = tmp_path / "DinoBloom-S.pth"
    payload = {"x": _RunsCode(marker), "teacher": {"backbone.cls_token": torch.zeros(1, 1, 384)}}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(payload, fh, protocol=2)  # torch's safe unpickler reads up to 2
    with pytest.raises(WeightsError, match="refused for safety") as info:
        load_backbone("dinobloom-s", weights=path)
    assert "system" in str(info.value)
    assert not marker.exists()


def test_pickle_the_safe_loader_cannot_parse_is_refused(tmp_path):
    """A plain protocol-5 pickle (opcodes torch's weights_only unpickler rejects) is
    refused for safety too, and its payload does not run."""
    marker = tmp_path / "PWNED"
    path = tmp_path / "weights.pth"
    with open(path, "wb") as fh:
        pickle.dump({"x": _RunsCode(marker)}, fh, protocol=5)
    with pytest.raises(WeightsError, match="refused for safety"):
        load_state_dict(path, MODEL_SPECS["dinobloom-s"])
    assert not marker.exists()


def test_pickled_custom_class_is_refused(tmp_path):
    """Any non-allowlisted global (here argparse.Namespace) is refused, not unpickled."""
    import argparse

    path = tmp_path / "ckpt.pth"
    torch.save({"teacher": {}, "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(WeightsError, match=r"refused for safety.*argparse\.Namespace|Namespace"):
        load_state_dict(path, MODEL_SPECS["dinobloom-s"])


def test_missing_keys_are_listed(s_small, tmp_path):
    teacher = dict(s_small["teacher"])
    for k in ("backbone.norm.weight", "backbone.blocks.0.attn.qkv.bias"):
        del teacher[k]
    path = write_pth(teacher, tmp_path / "missing.pth")
    with pytest.raises(WeightsError, match="2 missing keys") as info:
        load_state_dict(path, MODEL_SPECS["dinobloom-s"], depth=REDUCED_DEPTH)
    assert "norm.weight" in str(info.value)
    assert "blocks.0.attn.qkv.bias" in str(info.value)


def test_wrong_depth_and_foreign_files_are_named(s_small, tmp_path):
    spec = MODEL_SPECS["dinobloom-s"]
    with pytest.raises(WeightsError, match="2 transformer blocks but dinobloom-s has 12"):
        load_state_dict(s_small["pth"], spec)
    other = tmp_path / "other.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(3)}}, other)
    with pytest.raises(WeightsError, match="no cls_token"):
        load_state_dict(other, spec)
    not_dict = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), not_dict)
    with pytest.raises(WeightsError, match="not a state dict"):
        load_state_dict(not_dict, spec)


def test_original_dinov2_518_pos_embed_is_refused(s_small, tmp_path):
    """A 37x37 pos_embed (DINOv2 LVD-142M at 518 px) is not silently resampled."""
    teacher = dict(s_small["teacher"])
    teacher["backbone.pos_embed"] = torch.zeros(1, 1370, 384)
    path = write_pth(teacher, tmp_path / "dinov2.pth")
    with pytest.raises(WeightsError, match=r"1370 tokens.*original DINOv2"):
        load_state_dict(path, MODEL_SPECS["dinobloom-s"], depth=REDUCED_DEPTH)


# --------------------------------------------------------------------------- resolution


def test_cache_dir_env_and_default(monkeypatch, tmp_path):
    assert weights_cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("HEMOFM_WEIGHTS_DIR")
    import platformdirs

    default = weights_cache_dir()
    assert default.name == "weights"
    assert default.parent == Path(platformdirs.user_cache_dir("napari-hemofm", appauthor=False))


def test_nothing_found_says_where_to_get_weights(tmp_path):
    with pytest.raises(WeightsError) as info:
        resolve_weights("dinobloom-s")
    msg = str(info.value)
    for needle in (
        "10908163",
        "DinoBloom-S.pth",
        "1aurent/vit_small_patch14_224.dinobloom",
        "--weights",
        "--download",
        "HEMOFM_WEIGHTS_DIR",
        str(tmp_path / "cache" / "dinobloom-s" / "model.safetensors"),
    ):
        assert needle in msg, needle


@pytest.mark.parametrize(
    "where",
    [
        "dinobloom-s/model.safetensors",
        "dinobloom-s/DinoBloom-S.pth",
        "DinoBloom-S.pth",
        "dinobloom-s/dinobloom-s.pth",
    ],
)
def test_cache_layouts_are_found(tmp_path, where):
    path = tmp_path / "cache" / where
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x")
    assert resolve_weights("dinobloom-s", download=True) == path


def test_explicit_weights_beat_the_cache_and_must_exist(tmp_path, s_small):
    cached = tmp_path / "cache" / "dinobloom-s" / "model.safetensors"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"x")
    assert resolve_weights("dinobloom-s", s_small["pth"]) == s_small["pth"]
    assert resolve_weights("dinobloom-s", s_small["st"].parent) == s_small["st"]
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_weights("dinobloom-s", tmp_path / "nope.pth", download=True)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(WeightsError, match=r"model\.safetensors"):
        resolve_weights("dinobloom-s", empty)
    zenodo_dir = tmp_path / "zenodo"
    zenodo_dir.mkdir()
    (zenodo_dir / "DinoBloom-S.pth").write_bytes(b"x")
    assert resolve_weights("dinobloom-s", zenodo_dir) == zenodo_dir / "DinoBloom-S.pth"


@pytest.fixture
def fake_hub(monkeypatch, s_small):
    """Stands in for huggingface_hub.hf_hub_download: records calls, 'downloads' the
    small S safetensors, and drives the tqdm class it is given like the real one."""
    import huggingface_hub

    calls = []
    lock = threading.Lock()

    def fake(repo_id, filename, *, local_dir=None, tqdm_class=None, **kwargs):
        with lock:
            calls.append({"repo_id": repo_id, "filename": filename, "local_dir": local_dir})
        src = s_small["st"].parent / filename
        data = src.read_bytes()
        if tqdm_class is not None:
            bar = tqdm_class(total=len(data), initial=0, unit="B", disable=True)
            half = len(data) // 2
            bar.update(half)
            bar.update(len(data) - half)
            bar.close()
        dest = Path(local_dir) / filename
        dest.write_bytes(data)
        return str(dest)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    return calls


def test_download_only_when_asked(fake_hub, tmp_path):
    with pytest.raises(WeightsError, match="--download"):
        load_backbone("dinobloom-s", _depth=REDUCED_DEPTH)
    assert fake_hub == []
    seen = []
    bb = load_backbone(
        "dinobloom-s",
        download=True,
        _depth=REDUCED_DEPTH,
        progress=lambda d, t: seen.append((d, t)),
    )
    dest = tmp_path / "cache" / "dinobloom-s"
    assert {c["repo_id"] for c in fake_hub} == {"1aurent/vit_small_patch14_224.dinobloom"}
    assert {c["filename"] for c in fake_hub} == {"model.safetensors", "config.json"}
    assert all(Path(c["local_dir"]) == dest for c in fake_hub)
    size = (dest / "model.safetensors").stat().st_size
    assert seen == [(size // 2, size), (size, size)]
    assert bb.weights_sha256 == sha256_file(dest / "model.safetensors")
    # Second time the cache answers: no new download even with download=True.
    n = len(fake_hub)
    load_backbone("dinobloom-s", download=True, _depth=REDUCED_DEPTH)
    assert len(fake_hub) == n


def test_failed_download_is_one_clear_error(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(WeightsError, match=r"(?s)Downloading DinoBloom-B.*no network.*10908163"):
        resolve_weights("dinobloom-b", download=True)


def test_progress_callback_can_cancel_a_download(fake_hub, tmp_path):
    """What the progress callback raises (a cancel button) comes out unchanged."""

    class Cancelled(Exception):
        pass

    def cancel(done, total):
        raise Cancelled

    with pytest.raises(Cancelled):
        resolve_weights("dinobloom-s", download=True, progress=cancel)
