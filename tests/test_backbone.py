"""The shared re-id network: shapes, normalisation, non-local identity init, weight loading."""
from __future__ import annotations

import copy

from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models import ResNet50_Weights

from conftest import torch_threads
from dmdl_cli.errors import DmdlError
from dmdl_cli.model.backbone import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_model,
    model_signature,
    normalize_batch,
)
from dmdl_cli.model.weights import (
    IMAGENET_WEIGHTS,
    TORCHVISION_MODEL,
    hub_checkpoints_dir,
    missing_weights_message,
)
from dmdl_cli.recipe import ARCHS


@pytest.fixture(scope="module", autouse=True)
def two_torch_threads():
    """Two threads for this module's ResNet-50 forwards, set back after it (set at import, it
    held for every later module of the session)."""
    with torch_threads(2):
        yield


@pytest.fixture(scope="module")
def agw():
    """One resnet50_agw for the module (building a ResNet-50 dominates these tests' time)."""
    torch.manual_seed(0)
    return build_model("resnet50_agw")


@pytest.fixture(scope="module")
def plain50():
    return build_model("resnet50")


def _batch(b: int = 2, h: int = 64, w: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 3, h, w, generator=g)


@pytest.mark.parametrize("arch,dim", [("resnet18", 512), ("resnet50_agw", 2048)])
def test_output_shapes_train_and_eval(arch, dim, request):
    torch.manual_seed(0)
    model = request.getfixturevalue("agw") if arch == "resnet50_agw" else build_model(arch)
    assert model.feat_dim == dim and model.arch == arch
    assert "random initialisation" in model.init_description
    x = _batch()
    model.train()
    pool_feat, bn_feat = model(x)
    assert pool_feat.shape == (2, dim) and bn_feat.shape == (2, dim)
    assert bool((pool_feat >= 0).all())  # GeM of ReLU activations
    model.eval()
    with torch.no_grad():
        emb = model(x)
        fmap = model.feature_map(x)
    assert emb.shape == (2, dim)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    # last stride 1: a 64 x 32 input gives a 4 x 2 map (stride 16), not 2 x 1
    assert fmap.shape == (2, dim, 4, 2)


def test_neck_bias_frozen_and_signature(plain50):
    model = build_model("resnet18")
    assert not model.neck.bias.requires_grad and model.neck.weight.requires_grad
    sig = model_signature(model)
    assert sig == {
        "arch": "resnet18",
        "feat_dim": 512,
        "num_params": sum(p.numel() for p in model.parameters()),
    }
    assert model_signature(plain50)["num_params"] != sig["num_params"]


def test_non_local_starts_as_identity(agw, plain50):
    agw, plain = copy.deepcopy(agw), plain50
    assert len(agw.non_local["layer2"]) == 2 and len(agw.non_local["layer3"]) == 3
    assert agw._nl_after == {"layer2": (2, 3), "layer3": (3, 4, 5)}
    state = {k: v for k, v in agw.state_dict().items() if not k.startswith("non_local.")}
    plain.load_state_dict(state, strict=True)
    x = _batch(seed=1)
    for mode in ("train", "eval"):
        agw.train(mode == "train")
        plain.train(mode == "train")
        with torch.no_grad():
            a, b = agw(x), plain(x)
        a = a if isinstance(a, tuple) else (a,)
        b = b if isinstance(b, tuple) else (b,)
        for u, v in zip(a, b):
            torch.testing.assert_close(u, v, rtol=0, atol=0)
    # ... and the non-local blocks are not a no-op once W's BN is non-zero
    with torch.no_grad():
        for block in agw.non_local["layer3"]:
            block.W[1].weight.fill_(1.0)
        agw.eval()
        plain.eval()
        assert not torch.allclose(agw(x), plain(x))


def test_agw_backbone_keys_are_torchvision_resnet50_keys(agw):
    tv = torchvision.models.resnet50(weights=None)
    expected = {k for k in tv.state_dict() if not k.startswith("fc.")}
    assert set(agw.backbone.state_dict()) == expected


def test_channels_last_and_autocast():
    torch.manual_seed(0)
    model = build_model("resnet18").to(memory_format=torch.channels_last).eval()
    x = _batch().to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            emb = model(x)
    assert emb.dtype == torch.float32 and emb.shape == (2, 512)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    assert float((emb * ref).sum(1).min()) > 0.98  # bf16 trunk, same embedding direction
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pool_feat, bn_feat = model(x)
    (pool_feat.sum() + bn_feat.sum()).backward()
    assert model.backbone.conv1.weight.grad is not None


def test_normalize_batch():
    img = torch.tensor([0, 255], dtype=torch.uint8).view(1, 1, 1, 2).expand(2, 3, 1, 2).clone()
    out = normalize_batch(img)
    assert out.dtype == torch.float32 and out.shape == (2, 3, 1, 2)
    for c in range(3):
        assert out[0, c, 0, 0].item() == pytest.approx(-IMAGENET_MEAN[c] / IMAGENET_STD[c])
        assert out[0, c, 0, 1].item() == pytest.approx((1 - IMAGENET_MEAN[c]) / IMAGENET_STD[c])
    with pytest.raises(TypeError):
        normalize_batch(img.float())


def test_missing_imagenet_file_names_the_file_its_url_and_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.delenv("DMDL_WEIGHTS_DIR", raising=False)
    with pytest.raises(DmdlError) as err:
        build_model("resnet50_agw", pretrained="imagenet")
    msg = str(err.value)
    assert "\n" not in msg
    assert f"at {tmp_path / 'th' / 'hub' / 'checkpoints' / 'resnet50-0676ba61.pth'} " in msg
    assert f"serves it at {ResNet50_Weights.IMAGENET1K_V1.url})" in msg
    assert "model.pretrained" in msg
    # prepare-data says the same at once, without torch (dmdl_cli/model/weights.py)
    assert missing_weights_message("resnet50_agw", "imagenet") == msg


@pytest.mark.parametrize("env", [{}, {"XDG_CACHE_HOME": "xdg"}, {"TORCH_HOME": "th"},
                                 {"TORCH_HOME": "th", "XDG_CACHE_HOME": "xdg"}])
def test_the_hub_folder_is_torchs_own(env, tmp_path, monkeypatch):
    for name in ("TORCH_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, str(tmp_path / value))
    assert hub_checkpoints_dir() == Path(torch.hub.get_dir()) / "checkpoints"


def test_the_weight_urls_are_the_ones_torchvision_records():
    from torchvision.models import ResNet18_Weights

    enums = {("resnet50", "v1"): ResNet50_Weights.IMAGENET1K_V1,
             ("resnet50", "v2"): ResNet50_Weights.IMAGENET1K_V2,
             ("resnet18", "v1"): ResNet18_Weights.IMAGENET1K_V1}
    assert {key: url for key, (url, _) in IMAGENET_WEIGHTS.items()} == {
        key: weights.url for key, weights in enums.items()}
    assert set(TORCHVISION_MODEL) == set(ARCHS)
    for arch, name in TORCHVISION_MODEL.items():  # the trunk is that torchvision model's
        block = type(getattr(torchvision.models, name)(weights=None).layer1[0])
        assert type(build_model(arch).backbone.layer1[0]) is block


def test_missing_weights_message_only_when_the_recipe_asks_for_a_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.delenv("DMDL_WEIGHTS_DIR", raising=False)
    assert missing_weights_message("resnet18", None) is None
    assert "resnet18-f37072fd.pth" in missing_weights_message("resnet18", "imagenet")
    _touch(tmp_path / "th" / "hub" / "checkpoints", "resnet18-5c106cde.pth")  # the older name
    assert missing_weights_message("resnet18", "imagenet") is None
    assert "no ImageNet V2 weights for resnet18" in missing_weights_message("resnet18", "imagenet-v2")
    assert str(tmp_path / "mine.pth") in missing_weights_message("resnet18", tmp_path / "mine.pth")
    _touch(tmp_path, "mine.pth")
    assert missing_weights_message("resnet18", str(tmp_path / "mine.pth")) is None


def test_missing_local_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(DmdlError) as err:
        build_model("resnet18", pretrained=path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_local_pth_loads_and_hub_cache_is_found(tmp_path, monkeypatch):
    torch.manual_seed(123)
    tv = torchvision.models.resnet18(weights=None)
    ckpt_dir = tmp_path / "hub" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    path = ckpt_dir / "resnet18-f37072fd.pth"
    torch.save(tv.state_dict(), path)

    model = build_model("resnet18", pretrained=str(path))
    assert str(path) in model.init_description
    for k, v in model.backbone.state_dict().items():
        torch.testing.assert_close(v, tv.state_dict()[k], rtol=0, atol=0)

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    from_hub = build_model("resnet18", pretrained="imagenet")
    torch.testing.assert_close(from_hub.backbone.conv1.weight, tv.conv1.weight, rtol=0, atol=0)


def test_mismatching_state_dict_reports_keys(tmp_path):
    tv = torchvision.models.resnet18(weights=None)
    state = tv.state_dict()
    del state["layer1.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(DmdlError) as err:
        build_model("resnet18", pretrained=path)
    msg = str(err.value)
    assert "missing keys: layer1.0.conv1.weight" in msg and "unexpected keys: extra.weight" in msg
    assert "\n" not in msg
    # a resnet18 file for a resnet50 backbone: refused, no silent partial load
    torch.save(tv.state_dict(), path)
    with pytest.raises(DmdlError, match="do not match the resnet50 backbone"):
        build_model("resnet50", pretrained=path)


def test_unknown_arch():
    with pytest.raises(DmdlError, match="resnet50_agw"):
        build_model("vit")


# --- which ImageNet file is loaded (V1 by default, V2 only by name, never downloaded) --------
def _touch(folder, *names):
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")  # resolution looks at existence only
    return folder


def test_imagenet_means_v1_and_v2_only_when_named(tmp_path, monkeypatch):
    from dmdl_cli.model.backbone import _resolve_pretrained

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.delenv("DMDL_WEIGHTS_DIR", raising=False)
    ckpt = _touch(tmp_path / "th" / "hub" / "checkpoints", "resnet50-11ad3fa6.pth")
    # only V2 present: 'imagenet' refuses (no silent V2), naming the V1 file and where it goes
    with pytest.raises(DmdlError) as err:
        _resolve_pretrained("resnet50_agw", "imagenet")
    assert str(ckpt / "resnet50-0676ba61.pth") in str(err.value) and "V1" in str(err.value)
    assert _resolve_pretrained("resnet50_agw", "imagenet-v2") == ckpt / "resnet50-11ad3fa6.pth"
    _touch(ckpt, "resnet50-0676ba61.pth")
    assert _resolve_pretrained("resnet50", "imagenet") == ckpt / "resnet50-0676ba61.pth"
    assert _resolve_pretrained("resnet50", "ImageNet-V1") == ckpt / "resnet50-0676ba61.pth"
    # the legacy V1 file name is V1 too, the current name preferred
    (ckpt / "resnet50-0676ba61.pth").unlink()
    _touch(ckpt, "resnet50-19c8e357.pth")
    assert _resolve_pretrained("resnet50", "imagenet") == ckpt / "resnet50-19c8e357.pth"


def test_weights_dir_env_is_searched_before_the_hub_cache(tmp_path, monkeypatch):
    from dmdl_cli.model.backbone import _resolve_pretrained

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    _touch(tmp_path / "th" / "hub" / "checkpoints", "resnet18-f37072fd.pth")
    own = _touch(tmp_path / "mine", "resnet18-f37072fd.pth")
    monkeypatch.setenv("DMDL_WEIGHTS_DIR", str(own))
    assert _resolve_pretrained("resnet18", "imagenet") == own / "resnet18-f37072fd.pth"
    monkeypatch.setenv("DMDL_WEIGHTS_DIR", str(tmp_path / "empty"))
    assert (_resolve_pretrained("resnet18", "imagenet")
            == tmp_path / "th" / "hub" / "checkpoints" / "resnet18-f37072fd.pth")


def test_resnet18_has_no_v2(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(DmdlError) as err:
        build_model("resnet18", pretrained="imagenet-v2")
    assert "no ImageNet V2 weights for resnet18" in str(err.value) and "\n" not in str(err.value)


def test_resnet18_v1_from_torch_home_loads_and_says_which_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    monkeypatch.delenv("DMDL_WEIGHTS_DIR", raising=False)
    torch.manual_seed(5)
    tv = torchvision.models.resnet18(weights=None)
    path = _touch(tmp_path / "th" / "hub" / "checkpoints") / "resnet18-f37072fd.pth"
    torch.save(tv.state_dict(), path)
    model = build_model("resnet18", pretrained="imagenet")
    assert model.init_description.startswith(f"ImageNet V1 weights from {path}")
    torch.testing.assert_close(model.backbone.layer4[1].bn2.running_var, tv.layer4[1].bn2.running_var,
                               rtol=0, atol=0)


class _NotAWeight:
    """A pickled object of this class cannot be read with weights_only=True."""


def test_weights_are_read_with_weights_only(tmp_path):
    path = tmp_path / "pickle.pth"
    state = torchvision.models.resnet18(weights=None).state_dict()
    torch.save({**state, "evil": _NotAWeight()}, path)
    with pytest.raises(DmdlError) as err:
        build_model("resnet18", pretrained=path)
    assert f"cannot read pretrained weights {path}" in str(err.value)
