"""`model.backbone: timm:NAME`: any timm model re-grouped at its feature stages (a CNN, a
ConvNeXt, a ViT), checked against timm's own forward, frozen bit for bit, weights from a
state-dict file, and clear errors offline or for unknown names."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm")

from tltool.engine.plan import Round  # noqa: E402
from tltool.errors import ConfigError  # noqa: E402
from tltool.freeze import apply_freeze, snapshot_frozen, verify_unchanged  # noqa: E402
from tltool.models import HeadSettings, build_model, model_spec  # noqa: E402
from tltool.models.backbones import build_backbone, get_spec  # noqa: E402

# name -> (block names, feature width, side used in tests)
FAMILIES = {
    "resnet18": (["stem", "layer1", "layer2", "layer3", "layer4"], 512, 32),
    "convnext_atto": (["stages0", "stages1", "stages2", "stages3"], 320, 32),
    "vit_tiny_patch16_224": (["embed"] + [f"block{i}" for i in range(1, 13)], 192, 224),
}


@pytest.mark.parametrize("arch", FAMILIES)
def test_blocks_reproduce_timms_own_features(arch):
    names, width, side = FAMILIES[arch]
    torch.manual_seed(0)
    ref = timm.create_model(arch, pretrained=False).eval()
    backbone = build_backbone(f"timm:{arch}", {}, 3)
    assert backbone.block_names == names and backbone.out_features == width
    # the same random weights in both: load timm's state through the key mapping
    from tltool.models.library import load_library_state

    load_library_state(backbone, ref.state_dict(), "test")
    backbone.eval()
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        feats = ref.forward_features(x)
        want = ref.forward_head(feats, pre_logits=True) if arch.startswith("vit") else \
            feats.mean(dim=(2, 3))
        assert torch.allclose(backbone(x), want, atol=1e-5)
        # a cached prefix continues to the same answer
        k = len(names) // 2
        z = backbone.forward_blocks(x, k, pool=False)
        assert torch.allclose(backbone.forward_from(z, k), want, atol=1e-5)


@pytest.mark.parametrize("arch", FAMILIES)
def test_frozen_blocks_stay_bit_identical(arch):
    names, _, side = FAMILIES[arch]
    torch.manual_seed(0)
    spec = model_spec(f"timm:{arch}", {}, 3, HeadSettings("linear", 8, 0.0), 3)
    model = build_model(spec)
    k = len(names) // 2
    _, groups = apply_freeze(model, Round(k, "freeze", 1, 0.05, 1.0))
    snap = snapshot_frozen(model)
    before = {key: t.clone() for key, t in model.state_dict().items()}
    opt = torch.optim.SGD(groups, lr=0.05)
    model.train()
    for _ in range(2):
        x, y = torch.randn(2, 3, side, side), torch.randint(0, 3, (2,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert verify_unchanged(model, snap)["unchanged"]
    after = model.state_dict()
    frozen = tuple(f"backbone.blocks.{i}." for i in range(k))
    assert all(torch.equal(after[key], v) for key, v in before.items() if key.startswith(frozen))
    moved = [key for key, p in model.named_parameters() if p.requires_grad
             and key.startswith("backbone.") and not torch.equal(after[key], before[key])]
    assert moved


def test_pretrained_configuration_gives_size_and_normalisation():
    spec = get_spec("timm:vit_tiny_patch16_224")
    assert spec.default_size == 224 and spec.weights == ("timm",)
    assert spec.norm("timm") == ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])  # timm's config for it


def test_unknown_or_unsplittable_names_are_config_errors():
    with pytest.raises(ConfigError, match="did you mean timm:resnet18"):
        get_spec("timm:resnet19")
    with pytest.raises(ConfigError, match="is not a timm model"):
        get_spec("timm:")


@pytest.mark.slow  # a timm fine-tune end to end (about a minute)
def test_fine_tune_from_a_timm_state_dict_file_and_offline_named_weights(
        cli, write_config, tmp_path, monkeypatch):
    torch.manual_seed(0)
    ref = timm.create_model("resnet18", pretrained=False)
    torch.save(ref.state_dict(), tmp_path / "resnet18_timm.pth")
    base = {"seed": 0, "target": {"kind": "builtin", "name": "digits", "n_train": 60,
                                  "n_val": 30, "image_size": 32,
                                  "split": {"val": 0.2, "test": 0.4}},
            "model": {"backbone": "timm:resnet18", "weights": str(tmp_path / "resnet18_timm.pth"),
                      "frozen_layers": 3},
            "train": {"epochs": 1, "batch_size": 32, "channels_last": "off"},
            "decision": {"rule": "argmax"}}
    res = cli("freeze-finetune", write_config("t", base=base))
    assert res.code == 0, res.err
    run = tmp_path / res.out.strip()
    plan = json.loads((run / "freeze_plan.json").read_text())[0]
    assert [b["state"] for b in plan["blocks"]][:4] == ["frozen"] * 3 + ["trainable"]
    # the frozen stem holds timm's tensors exactly
    ckpt = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert torch.equal(ckpt["state_dict"]["backbone.blocks.0.parts.0.weight"],
                       ref.state_dict()["conv1.weight"])
    assert cli("evaluate", str(run)).code == 0  # the run reopens (timm model rebuilt)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    named = cli("freeze-finetune", write_config("n", {"model": {"weights": "timm"}}, base=base))
    assert named.code == 2 and "Hugging Face cache" in named.err
