"""Tests of wsi_pipeline.models, driven by the registry (like torchvision's test_models.py)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from wsi_pipeline.errors import ConfigError, TrainingError
from wsi_pipeline.models import (
    MILModel,
    MILOutput,
    PatchNormalize,
    get_backbone,
    get_model,
    list_backbones,
    list_models,
    load_backbone_weights,
    model_options,
)
from wsi_pipeline.models.registry import backbone_torchvision_arch

MODELS = list_models()
MODES = ["features", "smallcnn"]
D_FEAT = 24  # feature size in features mode
T_PX = 64  # patch size in end-to-end tests (smallcnn: 2x2 left at the last stage)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


def build(name: str, mode: str, num_classes: int = 2, **options) -> MILModel:
    if mode == "features":
        return get_model(name, num_classes=num_classes, backbone=None, in_dim=D_FEAT, **options)
    return get_model(name, num_classes=num_classes, backbone=mode, **options)


def make_bag(mode: str, n: int, *, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if mode == "features":
        return torch.randn(n, D_FEAT, generator=g)
    return torch.randint(0, 256, (n, 3, T_PX, T_PX), dtype=torch.uint8, generator=g)


def total_loss(model: MILModel, x: torch.Tensor, label: int) -> torch.Tensor:
    """Slide CE, plus CLAM's instance loss for every class so all parameters take part."""
    h = model.embed(x)
    out = model.head_forward(h)
    loss = F.cross_entropy(out.logits[None].float(), torch.tensor([label]))
    if hasattr(model.head, "instance_loss"):
        for c in range(model.head.num_classes):
            loss = loss + model.head.instance_loss(h, c, k_sample=2)
    return loss


# ---------------------------------------------------------------------------------------------
# package and registry


def test_import_wsi_pipeline_does_not_import_torch():
    code = "import sys, wsi_pipeline; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registry_lists():
    assert {"abmil", "gated_abmil", "maxmil", "topk", "meanmil", "clam_sb"} <= set(MODELS)
    assert {"resnet18", "resnet50", "smallcnn"} <= set(list_backbones())
    assert model_options("topk")["k"] == 5


def test_backbone_torchvision_arch():
    assert backbone_torchvision_arch("resnet50") == "resnet50"
    assert backbone_torchvision_arch("resnet18") == "resnet18"
    assert backbone_torchvision_arch("smallcnn") is None
    with pytest.raises(ConfigError, match=r"unknown backbone 'vgg'; known backbones: resnet18"):
        backbone_torchvision_arch("vgg")


def test_unknown_model_lists_known_names():
    with pytest.raises(ConfigError, match=r"unknown model 'nope'; known models: abmil, .*topk"):
        get_model("nope", num_classes=2)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"num_classes": 2, "heads": 3}, r"model 'abmil' has no option\(s\) 'heads'; options: "),
        ({}, r"model 'abmil' needs option\(s\) 'num_classes'"),
        ({"num_classes": 1}, r"num_classes must be an integer >= 2, got 1"),
        ({"num_classes": 2, "dropout": 1.5}, r"dropout must be a number in \[0, 1\), got 1.5"),
        ({"num_classes": 2, "hidden_dim": 0}, r"hidden_dim must be an integer >= 1, got 0"),
        ({"num_classes": 2, "backbone": None}, r"features mode \(backbone=None\) needs in_dim"),
        (
            {"num_classes": 2, "backbone": "vgg"},
            r"unknown backbone 'vgg'; known backbones: resnet18",
        ),
        (
            {"num_classes": 2, "in_dim": 64},
            r"in_dim=64 does not match backbone 'smallcnn' \(D=128\)",
        ),
        ({"num_classes": 2, "chunk_size": 0}, r"chunk_size must be a positive integer or None"),
        (
            {"num_classes": 2, "backbone": None, "in_dim": 8, "backbone_weights": "w.pt"},
            r"backbone_weights given but backbone is None",
        ),
    ],
)
def test_bad_options(options, match):
    with pytest.raises(ConfigError, match=match):
        get_model("abmil", **options)


def test_topk_bad_k():
    with pytest.raises(ConfigError, match=r"k must be an integer >= 1, got 0"):
        get_model("topk", num_classes=2, backbone=None, in_dim=4, k=0)


def test_bad_inputs():
    feat = build("abmil", "features")
    e2e = build("abmil", "smallcnn")
    with pytest.raises(ConfigError, match=r"expected features of shape \(N, 24\), got \(3, 5\)"):
        feat(torch.randn(3, 5))
    with pytest.raises(
        ConfigError, match=r"expected patches of shape \(N, 3, T, T\), got \(4, 24\)"
    ):
        e2e(torch.randn(4, D_FEAT))
    with pytest.raises(ConfigError, match=r"empty bag"):
        feat(torch.randn(0, D_FEAT))
    with pytest.raises(ConfigError, match=r"empty bag"):
        e2e(torch.zeros(0, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ConfigError, match=r"patches must be uint8 or floating point"):
        e2e(torch.zeros(2, 3, 8, 8, dtype=torch.int32))


# ---------------------------------------------------------------------------------------------
# every registered head × {features, end-to-end smallcnn}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("num_classes", [2, 4])
def test_output_shapes(name, mode, num_classes):
    model = build(name, mode, num_classes).eval()
    n = 7
    out = model(make_bag(mode, n))
    assert isinstance(out, MILOutput)
    assert out.logits.shape == (num_classes,)
    assert out.patch_logits.shape == (n, num_classes)
    assert out.logits.dtype == out.patch_logits.dtype == torch.float32
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.patch_logits).all()
    if out.attention is not None:
        assert out.attention.shape == (n,)
        assert out.attention.dtype == torch.float32
        assert (out.attention >= 0).all()
        torch.testing.assert_close(out.attention.sum(), torch.tensor(1.0))
    # embed + head_forward is the same computation
    again = model.head_forward(model.embed(make_bag(mode, n)))
    torch.testing.assert_close(again.logits, out.logits)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", MODELS)
def test_backward_reaches_every_parameter(name, mode):
    model = build(name, mode).train()
    total_loss(model, make_bag(mode, 9), label=1).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{pname} has an all-zero gradient"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", MODELS)
def test_permutation_invariance(name, mode):
    model = build(name, mode, num_classes=3).eval()
    x = make_bag(mode, 11)
    perm = torch.randperm(11)
    with torch.no_grad():
        out, out_p = model(x), model(x[perm])
    torch.testing.assert_close(out_p.logits, out.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_p.patch_logits, out.patch_logits[perm], rtol=1e-5, atol=1e-5)
    if out.attention is not None:
        torch.testing.assert_close(out_p.attention, out.attention[perm], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_several_bags_in_one_pass(mode):
    """``model(x, sizes)`` pools each bag on its own: in eval mode the same as one bag at a
    time; in train mode BatchNorm sees the patches of every bag together."""
    model = build("abmil", mode).eval()
    a, b = make_bag(mode, 5, seed=1), make_bag(mode, 7, seed=2)
    with torch.no_grad():
        outs = model(torch.cat([a, b]), [5, 7])
        one = [model(a), model(b)]
    assert len(outs) == 2 and outs[1].patch_logits.shape[0] == 7
    for got, want in zip(outs, one):
        torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.patch_logits, want.patch_logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="do not split"):
        model(torch.cat([a, b]), [5, 6])
    if mode == "smallcnn":  # train mode: batch statistics over both bags, not one
        model.train()
        with torch.no_grad():
            together = model(torch.cat([a, b]), [5, 7])[0].patch_logits
            alone = model(a).patch_logits
        assert not torch.allclose(together, alone)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", MODELS)
def test_single_instance_bag(name, mode):
    model = build(name, mode).train()
    x = make_bag(mode, 1)
    total_loss(model, x, label=0).backward()
    out = model.eval()(x)
    assert out.logits.shape == (2,) and out.patch_logits.shape == (1, 2)
    if out.attention is not None:
        torch.testing.assert_close(out.attention, torch.ones(1))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", MODELS)
def test_deterministic_given_seed(name, mode):
    x = make_bag(mode, 6)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        model = build(name, mode).train()  # dropout active: same seed, same masks
        outs.append(model(x).logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("mode", "dtype"),
    [("features", torch.bfloat16), ("features", torch.float16), ("smallcnn", torch.bfloat16)],
)
@pytest.mark.parametrize("name", MODELS)
def test_autocast(name, mode, dtype):
    model = build(name, mode).train()
    x = make_bag(mode, 10)
    with torch.autocast("cpu", dtype=dtype):
        h = model.embed(x)
        out = model.head_forward(h)
        loss = F.cross_entropy(out.logits[None].float(), torch.tensor([1]))
        if hasattr(model.head, "instance_loss"):
            loss = loss + model.head.instance_loss(h, 1, k_sample=3)
    loss.backward()
    assert torch.isfinite(out.logits.float()).all()
    if out.attention is not None:
        assert out.attention.dtype == torch.float32
        torch.testing.assert_close(out.attention.sum(), torch.tensor(1.0))
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---------------------------------------------------------------------------------------------
# head-specific semantics


def test_maxmil_binary_takes_top_positive_instance():
    model = get_model("maxmil", num_classes=2, backbone=None, in_dim=D_FEAT).eval()
    out = model(make_bag("features", 13))
    top = torch.argmax(out.patch_logits[:, 1] - out.patch_logits[:, 0])
    torch.testing.assert_close(out.logits, out.patch_logits[top])


def test_maxmil_multiclass_max_per_class():
    model = get_model("maxmil", num_classes=4, backbone=None, in_dim=D_FEAT).eval()
    out = model(make_bag("features", 13))
    torch.testing.assert_close(out.logits, out.patch_logits.max(dim=0).values)


@pytest.mark.parametrize("num_classes", [2, 3])
def test_topk_clips_k_to_bag_size(num_classes):
    model = get_model("topk", num_classes=num_classes, backbone=None, in_dim=D_FEAT, k=50).eval()
    out = model(make_bag("features", 6))
    torch.testing.assert_close(out.logits, out.patch_logits.mean(dim=0))


def test_meanmil_is_mean_of_projection():
    model = get_model("meanmil", num_classes=2, backbone=None, in_dim=D_FEAT).eval()
    x = make_bag("features", 5)
    out = model(x)
    head = model.head
    torch.testing.assert_close(out.logits, head.classifier(head.proj(x).mean(0)))


@pytest.mark.parametrize("subtyping", [False, True])
def test_clam_instance_loss(subtyping):
    model = get_model(
        "clam_sb", num_classes=3, backbone=None, in_dim=D_FEAT, subtyping=subtyping, dropout=0.0
    )
    h = make_bag("features", 20)
    loss = model.head.instance_loss(h, torch.tensor(2), k_sample=4)
    assert loss.shape == () and loss.dtype == torch.float32 and loss > 0
    loss.backward()
    grads = [clf.weight.grad for clf in model.head.instance_classifiers]
    assert grads[2] is not None and grads[2].abs().sum() > 0
    if subtyping:
        assert all(g is not None and g.abs().sum() > 0 for g in grads)
    else:
        assert grads[0] is None and grads[1] is None
    # a bag of one instance: zero loss, still differentiable
    zero = model.head.instance_loss(h[:1], 0)
    assert zero.item() == 0.0 and zero.requires_grad
    with pytest.raises(ConfigError, match=r"label must be in \[0, 3\), got 3"):
        model.head.instance_loss(h, 3)


def test_clam_instance_loss_uses_attention_extremes():
    model = get_model("clam_sb", num_classes=2, backbone=None, in_dim=D_FEAT, dropout=0.0)
    head = model.head
    h = make_bag("features", 10)
    hp = head.proj(h)
    attention = torch.softmax(head.attention_scores(hp), 0)
    order = torch.argsort(attention, descending=True)
    x = torch.cat([hp[order[:3]], hp[order[-3:]]])
    expected = F.cross_entropy(head.instance_classifiers[1](x), torch.tensor([1, 1, 1, 0, 0, 0]))
    torch.testing.assert_close(head.instance_loss(h, 1, k_sample=3), expected)


# ---------------------------------------------------------------------------------------------
# backbones


@pytest.mark.parametrize(
    ("name", "dim"), [("smallcnn", 128), ("resnet18", 512), ("resnet50", 2048)]
)
def test_backbone_dims(name, dim):
    module, d = get_backbone(name)
    assert d == dim
    with torch.no_grad():
        y = module.eval()(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, dim)
    model = get_model("meanmil", num_classes=2, backbone=name)
    assert model.in_dim == dim


def test_patch_normalize():
    norm = PatchNormalize()
    x8 = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    y = norm(x8)
    torch.testing.assert_close(y, norm(x8.float() / 255))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    torch.testing.assert_close(y, (x8.float() / 255 - mean) / std)
    cl = x8.contiguous(memory_format=torch.channels_last)
    assert norm(cl).is_contiguous(memory_format=torch.channels_last)
    assert "mean" not in norm.state_dict()  # constants stay out of checkpoints


def test_uint8_float_and_channels_last_inputs_agree():
    model = build("abmil", "smallcnn").eval()
    x8 = make_bag("smallcnn", 5)
    with torch.no_grad():
        ref = model(x8)
        as_float = model(x8.float() / 255)
        model_cl = model.to(memory_format=torch.channels_last)
        cl = model_cl(x8.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(as_float.logits, ref.logits)
    torch.testing.assert_close(cl.logits, ref.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cl.attention, ref.attention, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# backbone weights


@pytest.fixture(scope="module")
def resnet18_source():
    torch.manual_seed(7)
    model = torchvision.models.resnet18(weights=None)
    # non-default BN stats, so a forgotten buffer would show
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _reference(source: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        fc = source.fc
        source.fc = nn.Identity()
        try:
            return source(x)
        finally:
            source.fc = fc


@pytest.mark.parametrize("layout", ["plain", "module_prefix", "state_dict_key", "model_key", "mil"])
def test_resnet18_weights_round_trip(resnet18_source, tmp_path, layout):
    sd = resnet18_source.state_dict()  # includes fc.weight / fc.bias
    assert "fc.weight" in sd
    obj = {
        "plain": sd,
        "module_prefix": {f"module.{k}": v for k, v in sd.items()},
        "state_dict_key": {"state_dict": sd, "epoch": 3},
        "model_key": {"model": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {}},
        "mil": {**{f"backbone.{k}": v for k, v in sd.items()}, "head.w": torch.zeros(1)},
    }[layout]
    path = tmp_path / "weights.pt"
    torch.save(obj, path)
    backbone, dim = get_backbone("resnet18", weights=path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        y = backbone.eval()(x)
    assert dim == 512
    torch.testing.assert_close(y, _reference(resnet18_source, x), rtol=0, atol=0)


def test_model_backbone_weights_option(resnet18_source, tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(resnet18_source.state_dict(), path)
    model = get_model("abmil", num_classes=2, backbone="resnet18", backbone_weights=str(path))
    torch.testing.assert_close(
        model.backbone.conv1.weight, resnet18_source.conv1.weight, rtol=0, atol=0
    )


def test_model_backbone_weights_none_is_random_init():
    torch.manual_seed(4)
    a = get_model("abmil", num_classes=2, backbone="smallcnn", backbone_weights="none")
    torch.manual_seed(4)
    b = get_model("abmil", num_classes=2, backbone="smallcnn")
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(v, w, rtol=0, atol=0, msg=k)


def test_smallcnn_weights_from_saved_mil_model(tmp_path):
    model = build("abmil", "smallcnn").eval()
    path = tmp_path / "mil.pt"
    torch.save({"state_dict": model.state_dict()}, path)
    torch.manual_seed(99)
    backbone, _ = get_backbone("smallcnn", weights=path)
    x = make_bag("smallcnn", 3)
    with torch.no_grad():
        torch.testing.assert_close(backbone.eval()(model.normalize(x)), model.embed(x))


class _NotAllowed:  # weights_only unpickling refuses arbitrary classes
    pass


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (None, r"missing\.pt: no such weights file"),
        (lambda p: p.write_bytes(b"\x00garbage, not a torch file" * 10), r"garbage\.pt: "),
        (
            lambda p: torch.save({"x": _NotAllowed()}, p),
            r"garbage\.pt: not a weights-only torch file",
        ),
        (
            lambda p: torch.save({"lr": 0.1, "epoch": 3}, p),
            r"garbage\.pt: not a state dict: 2 entries",
        ),
        (lambda p: torch.save([torch.zeros(1)], p), r"garbage\.pt: not a state dict \(got list\)"),
        (lambda p: torch.save({}, p), r"garbage\.pt: not a state dict \(got dict of length 0\)"),
    ],
)
def test_unreadable_weights(tmp_path, make, match):
    path = tmp_path / ("missing.pt" if make is None else "garbage.pt")
    if make is not None:
        make(path)
    with pytest.raises(TrainingError, match=match):
        get_backbone("smallcnn", weights=path)


def test_truncated_weights_file(resnet18_source, tmp_path):
    path = tmp_path / "cut.pt"
    torch.save(resnet18_source.state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TrainingError, match=r"cut\.pt: cannot read weights file: \w+"):
        get_backbone("resnet18", weights=path)


def test_weights_of_wrong_architecture(tmp_path):
    small = tmp_path / "smallcnn.pt"
    torch.save(get_backbone("smallcnn")[0].state_dict(), small)
    with pytest.raises(
        TrainingError,
        match=r"smallcnn\.pt: weights do not fit backbone ResNet: \d+ missing key\(s\) \(conv1\.weight, .*"
        r"unexpected key\(s\) \(features\.0\.0\.weight",
    ):
        get_backbone("resnet18", weights=small)
    r34 = tmp_path / "r34.pt"
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), r34)
    with pytest.raises(TrainingError, match=r"r34\.pt: .* unexpected key\(s\) \(layer1\.2\."):
        get_backbone("resnet18", weights=r34)
    wide = tmp_path / "wide.pt"
    sd = get_backbone("smallcnn")[0].state_dict()
    sd["features.0.0.weight"] = torch.zeros(8, 3, 3, 3)
    torch.save(sd, wide)
    with pytest.raises(
        TrainingError,
        match=r"shape mismatch\(es\) \(features\.0\.0\.weight file \(8, 3, 3, 3\) vs model \(16, 3, 3, 3\)\)",
    ):
        load_backbone_weights(get_backbone("smallcnn")[0], wide)


def test_weights_without_num_batches_tracked(tmp_path):
    module, _ = get_backbone("smallcnn")
    sd = {k: v for k, v in module.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "old.pt"
    torch.save(sd, path)
    load_backbone_weights(get_backbone("smallcnn")[0], path)


# ---------------------------------------------------------------------------------------------
# gradient checkpointing


def _grads_and_stats(model: MILModel, x: torch.Tensor) -> tuple[dict, dict]:
    torch.manual_seed(5)  # same dropout masks in the head
    total_loss(model, x, label=1).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    buffers = {
        k: b.clone() for k, b in model.state_dict().items() if "running" in k or "batches" in k
    }
    return grads, buffers


@pytest.mark.parametrize("name", ["abmil", "clam_sb"])
def test_grad_checkpoint_same_gradients_train_mode(name):
    x = make_bag("smallcnn", 20)
    torch.manual_seed(0)
    plain = build(name, "smallcnn", chunk_size=8).train()
    ckpt = build(name, "smallcnn", chunk_size=8, grad_checkpoint=True).train()
    ckpt.load_state_dict(plain.state_dict())
    g0, b0 = _grads_and_stats(plain, x)
    g1, b1 = _grads_and_stats(ckpt, x)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-6, msg=k)
    # BatchNorm running stats were updated once per chunk, not again during recomputation
    for k in b0:
        torch.testing.assert_close(b1[k], b0[k], rtol=1e-6, atol=1e-7, msg=k)
    assert int(b1["backbone.features.0.1.num_batches_tracked"]) == 3  # ceil(20 / 8) chunks


def test_grad_checkpoint_default_chunks_eval_mode():
    x = make_bag("smallcnn", 70)  # > 64: two checkpointed chunks vs one pass
    plain = build("abmil", "smallcnn", dropout=0.0).eval()
    ckpt = build("abmil", "smallcnn", dropout=0.0, grad_checkpoint=True).eval()
    ckpt.load_state_dict(plain.state_dict())
    g0, _ = _grads_and_stats(plain, x)
    g1, _ = _grads_and_stats(ckpt, x)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6, msg=k)


def test_embed_under_inference_mode_skips_checkpoint():
    model = build("abmil", "smallcnn", grad_checkpoint=True, chunk_size=4).eval()
    x = make_bag("smallcnn", 10)
    with torch.inference_mode():
        h = model.embed(x)
    assert h.shape == (10, 128) and not h.requires_grad


# ---------------------------------------------------------------------------------------------
# learning


def _lesion_bags(n_bags: int, rng: np.random.Generator, direction: np.ndarray):
    bags = []
    for i in range(n_bags):
        n = int(rng.integers(8, 40))
        x = rng.normal(size=(n, direction.size)).astype(np.float32)
        label = i % 2
        lesions = np.array([], dtype=int)
        if label:
            lesions = rng.choice(n, size=int(rng.integers(1, 4)), replace=False)
            x[lesions] += 6.0 * direction  # lesions: shifted by 6 sd along one direction
        bags.append((torch.from_numpy(x), label, set(lesions.tolist())))
    return bags


def test_abmil_learns_lesion_bags_and_attends_to_lesions():
    rng = np.random.default_rng(0)
    d = 16
    direction = rng.normal(size=d).astype(np.float32)
    direction /= np.linalg.norm(direction)
    train, test = _lesion_bags(40, rng, direction), _lesion_bags(30, rng, direction)
    torch.manual_seed(0)
    model = get_model("abmil", num_classes=2, backbone=None, in_dim=d, hidden_dim=32, attn_dim=16)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for step in range(300):
        x, label, _ = train[step % len(train)]
        loss = F.cross_entropy(model(x).logits[None], torch.tensor([label]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    correct, hits, lesions_total = 0, 0, 0
    with torch.no_grad():
        for x, label, lesions in test:
            out = model(x)
            correct += int(out.logits.argmax()) == label
            if label:
                top = torch.topk(out.attention, len(lesions)).indices.tolist()
                hits += len(lesions & set(top))
                lesions_total += len(lesions)
    assert correct / len(test) >= 0.9  # held-out bags
    assert hits / lesions_total >= 0.9  # the top-m attended instances are the m lesions
