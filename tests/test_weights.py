"""PyTorch weight import: logits equal those of reference PyTorch modules written here in each source's layout.

Each reference module below follows the naming and forward pass of the code its weights come from
(the common CIFAR ResNet-20 with option-A shortcuts, the common CIFAR VGG with BatchNorm,
RobustBench's WideResNet, torchvision's ResNet, timm's VisionTransformer). It is randomly
initialised, given random BatchNorm running statistics, put in eval mode, saved with ``torch.save``
(wrapped as training scripts do) and as safetensors, imported, and compared in float64 (the
reference) against our float32 logits. Full-size models are checked by shapes only (meta tensors,
``jax.eval_shape``). The safetensors path is also checked with no PyTorch at all, against a NumPy
reference forward pass.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rnd_jax import nets, weights

ATOL = 1e-4


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


# ----------------------------------------------------------------------------------------------
# Reference PyTorch modules (built lazily so this file imports without torch)
# ----------------------------------------------------------------------------------------------


def _reference_classes(torch):
    tnn, F = torch.nn, torch.nn.functional

    class CifarBlock(tnn.Module):  # option-A basic block, the common CIFAR ResNet layout
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = tnn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
            self.bn1 = tnn.BatchNorm2d(cout)
            self.conv2 = tnn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
            self.bn2 = tnn.BatchNorm2d(cout)
            self.pad = (cout // 4, cout // 4) if (stride != 1 or cin != cout) else None

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            sc = x if self.pad is None else F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, *self.pad))
            return F.relu(out + sc)

    class CifarResNet(tnn.Module):
        def __init__(self, n=3, num_classes=10):
            super().__init__()
            self.conv1 = tnn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
            self.bn1 = tnn.BatchNorm2d(16)
            cin = 16
            for s, cout in enumerate((16, 32, 64), start=1):
                blocks = []
                for i in range(n):
                    blocks.append(CifarBlock(cin, cout, 2 if (s > 1 and i == 0) else 1))
                    cin = cout
                setattr(self, f"layer{s}", tnn.Sequential(*blocks))
            self.linear = tnn.Linear(64, num_classes)

        def forward(self, x):
            out = F.relu(self.bn1(self.conv1(x)))
            out = self.layer3(self.layer2(self.layer1(out)))
            out = F.avg_pool2d(out, out.size()[3])
            return self.linear(out.view(out.size(0), -1))

    class VGG(tnn.Module):  # the common CIFAR layout: features Sequential + one linear
        def __init__(self, cfg, flat, num_classes=10):
            super().__init__()
            layers, cin = [], 3
            for v in cfg:
                if v == "M":
                    layers.append(tnn.MaxPool2d(kernel_size=2, stride=2))
                else:
                    layers += [tnn.Conv2d(cin, v, kernel_size=3, padding=1), tnn.BatchNorm2d(v), tnn.ReLU(inplace=True)]
                    cin = v
            layers.append(tnn.AvgPool2d(kernel_size=1, stride=1))
            self.features = tnn.Sequential(*layers)
            self.classifier = tnn.Linear(flat, num_classes)

        def forward(self, x):
            out = self.features(x)
            return self.classifier(out.view(out.size(0), -1))

    class WideBlock(tnn.Module):  # RobustBench / TRADES pre-activation block
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.bn1 = tnn.BatchNorm2d(cin)
            self.relu1 = tnn.ReLU(inplace=True)
            self.conv1 = tnn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
            self.bn2 = tnn.BatchNorm2d(cout)
            self.relu2 = tnn.ReLU(inplace=True)
            self.conv2 = tnn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
            self.equal = cin == cout
            self.convShortcut = None if self.equal else tnn.Conv2d(cin, cout, 1, stride=stride, padding=0, bias=False)

        def forward(self, x):
            if self.equal:
                out = self.relu1(self.bn1(x))
            else:
                x = self.relu1(self.bn1(x))
            out = self.relu2(self.bn2(self.conv1(out if self.equal else x)))
            out = self.conv2(out)
            return (x if self.equal else self.convShortcut(x)) + out

    class NetworkBlock(tnn.Module):
        def __init__(self, n, cin, cout, stride):
            super().__init__()
            self.layer = tnn.Sequential(*[WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                                          for i in range(n)])

        def forward(self, x):
            return self.layer(x)

    class WideResNet(tnn.Module):
        def __init__(self, depth=28, widen=10, num_classes=10):
            super().__init__()
            n, ch = (depth - 4) // 6, [16, 16 * widen, 32 * widen, 64 * widen]
            self.conv1 = tnn.Conv2d(3, ch[0], 3, stride=1, padding=1, bias=False)
            self.block1 = NetworkBlock(n, ch[0], ch[1], 1)
            self.block2 = NetworkBlock(n, ch[1], ch[2], 2)
            self.block3 = NetworkBlock(n, ch[2], ch[3], 2)
            self.bn1 = tnn.BatchNorm2d(ch[3])
            self.relu = tnn.ReLU(inplace=True)
            self.fc = tnn.Linear(ch[3], num_classes)
            self.ch = ch[3]

        def forward(self, x):
            out = self.block3(self.block2(self.block1(self.conv1(x))))
            out = F.avg_pool2d(self.relu(self.bn1(out)), 8)
            return self.fc(out.view(-1, self.ch))

    class Bottleneck(tnn.Module):  # torchvision layout, stride on the 3x3 conv
        def __init__(self, cin, planes, stride):
            super().__init__()
            self.conv1 = tnn.Conv2d(cin, planes, 1, bias=False)
            self.bn1 = tnn.BatchNorm2d(planes)
            self.conv2 = tnn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
            self.bn2 = tnn.BatchNorm2d(planes)
            self.conv3 = tnn.Conv2d(planes, planes * 4, 1, bias=False)
            self.bn3 = tnn.BatchNorm2d(planes * 4)
            self.relu = tnn.ReLU(inplace=True)
            self.downsample = None
            if stride != 1 or cin != planes * 4:
                self.downsample = tnn.Sequential(tnn.Conv2d(cin, planes * 4, 1, stride=stride, bias=False),
                                                 tnn.BatchNorm2d(planes * 4))

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            return self.relu(out + (x if self.downsample is None else self.downsample(x)))

    class ResNet(tnn.Module):
        def __init__(self, layers=(3, 4, 6, 3), width=64, num_classes=1000):
            super().__init__()
            self.conv1 = tnn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
            self.bn1 = tnn.BatchNorm2d(width)
            self.relu = tnn.ReLU(inplace=True)
            self.maxpool = tnn.MaxPool2d(kernel_size=3, stride=2, padding=1)
            cin = width
            for s, n in enumerate(layers, start=1):
                planes = width * 2 ** (s - 1)
                blocks = []
                for i in range(n):
                    blocks.append(Bottleneck(cin, planes, 2 if (s > 1 and i == 0) else 1))
                    cin = planes * 4
                setattr(self, f"layer{s}", tnn.Sequential(*blocks))
            self.avgpool = tnn.AdaptiveAvgPool2d((1, 1))
            self.fc = tnn.Linear(cin, num_classes)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    class PatchEmbed(tnn.Module):
        def __init__(self, patch, dim):
            super().__init__()
            self.proj = tnn.Conv2d(3, dim, kernel_size=patch, stride=patch)

        def forward(self, x):
            return self.proj(x).flatten(2).transpose(1, 2)

    class Attention(tnn.Module):  # timm: fused qkv, rows [q; k; v], heads inside each
        def __init__(self, dim, heads):
            super().__init__()
            self.heads, self.scale = heads, (dim // heads) ** -0.5
            self.qkv = tnn.Linear(dim, dim * 3, bias=True)
            self.proj = tnn.Linear(dim, dim)

        def forward(self, x):
            b, n, c = x.shape
            qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
            return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))

    class Mlp(tnn.Module):
        def __init__(self, dim, hidden):
            super().__init__()
            self.fc1, self.act, self.fc2 = tnn.Linear(dim, hidden), tnn.GELU(), tnn.Linear(hidden, dim)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    class Block(tnn.Module):
        def __init__(self, dim, heads, hidden):
            super().__init__()
            self.norm1 = tnn.LayerNorm(dim, eps=1e-6)
            self.attn = Attention(dim, heads)
            self.norm2 = tnn.LayerNorm(dim, eps=1e-6)
            self.mlp = Mlp(dim, hidden)

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class ViT(tnn.Module):
        def __init__(self, img=224, patch=16, dim=768, depth=12, heads=12, num_classes=1000):
            super().__init__()
            self.patch_embed = PatchEmbed(patch, dim)
            self.cls_token = tnn.Parameter(torch.randn(1, 1, dim) * 0.02)
            self.pos_embed = tnn.Parameter(torch.randn(1, (img // patch) ** 2 + 1, dim) * 0.02)
            self.blocks = tnn.Sequential(*[Block(dim, heads, 4 * dim) for _ in range(depth)])
            self.norm = tnn.LayerNorm(dim, eps=1e-6)
            self.head = tnn.Linear(dim, num_classes)

        def forward(self, x):
            x = self.patch_embed(x)
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
            return self.head(self.norm(self.blocks(x))[:, 0])

    return dict(resnet20=CifarResNet, vgg=VGG, wrn=WideResNet, resnet=ResNet, vit=ViT)


# (flax model, reference factory, input (H, W, C)) for the tiny variants compared numerically.
TINY = {
    "resnet20": (lambda: nets.resnet20(), lambda R: R["resnet20"](n=3), (32, 32, 3)),
    "vgg": (lambda: nets.VGG(cfg=(8, "M", 16, "M", 16, 16, "M")),
            lambda R: R["vgg"]((8, "M", 16, "M", 16, 16, "M"), flat=16 * 4 * 4), (32, 32, 3)),
    "wrn16_2": (lambda: nets.WideResNet(depth=16, widen_factor=2), lambda R: R["wrn"](16, 2), (32, 32, 3)),
    "resnet_tiny": (lambda: nets.ResNet(layers=(1, 2, 1, 1), width=8, num_classes=10),
                    lambda R: R["resnet"]((1, 2, 1, 1), 8, 10), (32, 32, 3)),
    "vit_tiny": (lambda: nets.VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
                                                num_classes=10),
                 lambda R: R["vit"](32, 8, 64, 2, 4, 10), (32, 32, 3)),
}


def _randomize(torch, module, seed):
    """Random weights (default init, re-seeded) and random BatchNorm affine + running statistics."""
    torch.manual_seed(seed)
    for m in module.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.reset_parameters()
        if isinstance(m, torch.nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
                m.running_mean.normal_(0.0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
        if isinstance(m, torch.nn.LayerNorm):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
    return module.eval()


@pytest.mark.parametrize("name", sorted(TINY))
def test_logits_match_pytorch_reference(torch, tmp_path, name):
    from safetensors.torch import save_file

    make_flax, make_ref, shape = TINY[name]
    model = make_flax()
    ref = _randomize(torch, make_ref(_reference_classes(torch)), seed=sorted(TINY).index(name))
    sd = ref.state_dict()
    # As training scripts save them: wrapped, with DataParallel's prefix; and a plain safetensors file.
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))

    x = np.random.default_rng(0).uniform(0.0, 1.0, (3, *shape)).astype(np.float32)
    if model.mean is None:
        xn = x.astype(np.float64)
    else:
        xn = (x.astype(np.float64) - np.asarray(model.mean)) / np.asarray(model.std)
    with torch.no_grad():
        expected = ref.double()(torch.from_numpy(xn.transpose(0, 3, 1, 2).copy())).numpy()
    assert 0.1 < np.abs(expected).max() < 30, "reference logits should be O(1) for a meaningful tolerance"

    p_pt = weights.load_params(model, tmp_path / "w.pth", shape)
    p_st = weights.load_params(model, tmp_path / "w.safetensors", shape)
    jax.tree.map(np.testing.assert_array_equal, p_pt, p_st)
    got = np.asarray(jax.jit(model.apply)({"params": p_pt}, x))
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


# ----------------------------------------------------------------------------------------------
# Full-size models: shapes only
# ----------------------------------------------------------------------------------------------

# name -> (flax factory, reference factory, input shape, published parameter count)
FULL = {
    # He et al. (2016) Table 6: 0.27M. Stem 432 + 32, stages 14,016 / 51,072 / 203,520 (option-A
    # shortcuts have no parameters), linear 650.
    "resnet20": (nets.resnet20, lambda R: R["resnet20"](3, 10), (32, 32, 3), 269_722),
    # 13 convs with bias 14,714,688 + 13 BNs (4,224 channels x 2) 8,448 + linear 512*10+10 = 5,130.
    "vgg16": (nets.vgg16, lambda R: R["vgg"](nets.VGG16_CFG, 512, 10), (32, 32, 3), 14_728_266),
    "wrn28_10": (nets.wrn28_10, lambda R: R["wrn"](28, 10, 10), (32, 32, 3), 36_479_194),
    "resnet50": (nets.resnet50, lambda R: R["resnet"]((3, 4, 6, 3), 64, 1000), (224, 224, 3), 25_557_032),
    "vit_b16": (nets.vit_b16, lambda R: R["vit"](224, 16, 768, 12, 12, 1000), (224, 224, 3), 86_567_656),
}


@functools.cache
def _full_abstract_params(name):
    factory, _, shape, _ = FULL[name]
    x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    return jax.eval_shape(functools.partial(factory().init, jax.random.key(0)), x)["params"]


@pytest.mark.parametrize("name", sorted(FULL))
def test_full_models_have_published_parameter_counts(name):
    assert nets.count_params(_full_abstract_params(name)) == FULL[name][3]


@pytest.mark.parametrize("name", sorted(FULL))
def test_full_models_expect_the_reference_state_dict(torch, name):
    """Every key and shape of the full-size reference module (meta tensors: no memory, no FLOPs)."""
    factory, make_ref, shape, count = FULL[name]
    with torch.device("meta"):
        ref = make_ref(_reference_classes(torch))
    got = weights.expected_state_dict_shapes(factory(), shape)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert got == want
    assert sum(p.numel() for p in ref.parameters()) == count


# ----------------------------------------------------------------------------------------------
# Without PyTorch: safetensors against a NumPy reference
# ----------------------------------------------------------------------------------------------

TINY_VGG_CFG = (4, "M", 8, "M")


def _numpy_vgg_state_dict(rng):
    """A tiny VGG (cfg 4, M, 8, M on 8x8x3; 2x2x8 features -> 10) in the CIFAR layout's names."""
    sd = {}
    for index, (cin, cout) in ((0, (3, 4)), (4, (4, 8))):
        sd[f"features.{index}.weight"] = rng.normal(0, 0.2, (cout, cin, 3, 3))
        sd[f"features.{index}.bias"] = rng.normal(0, 0.1, (cout,))
        bn = f"features.{index + 1}"
        sd[f"{bn}.weight"] = rng.uniform(0.5, 1.5, (cout,))
        sd[f"{bn}.bias"] = rng.normal(0, 0.2, (cout,))
        sd[f"{bn}.running_mean"] = rng.normal(0, 0.3, (cout,))
        sd[f"{bn}.running_var"] = rng.uniform(0.5, 2.0, (cout,))
    sd["classifier.weight"] = rng.normal(0, 0.1, (10, 8 * 2 * 2))
    sd["classifier.bias"] = rng.normal(0, 0.1, (10,))
    sd = {k: v.astype(np.float32) for k, v in sd.items()}
    sd["features.1.num_batches_tracked"] = np.array(5, np.int64)
    sd["features.5.num_batches_tracked"] = np.array(5, np.int64)
    return sd


def _numpy_vgg_logits(sd, x_nhwc, mean, std):
    x = ((x_nhwc.astype(np.float64) - np.asarray(mean)) / np.asarray(std)).transpose(0, 3, 1, 2)
    for index in (0, 4):
        w, b = sd[f"features.{index}.weight"].astype(np.float64), sd[f"features.{index}.bias"]
        n, _, h, wd = x.shape
        xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
        out = np.zeros((n, w.shape[0], h, wd))
        for i in range(3):
            for j in range(3):
                out += np.einsum("nchw,oc->nohw", xp[:, :, i:i + h, j:j + wd], w[:, :, i, j])
        out += b[None, :, None, None]
        bn = {k: sd[f"features.{index + 1}.{k}"][None, :, None, None]
              for k in ("weight", "bias", "running_mean", "running_var")}
        out = (out - bn["running_mean"]) / np.sqrt(bn["running_var"] + 1e-5) * bn["weight"] + bn["bias"]
        out = np.maximum(out, 0.0)
        x = out.reshape(n, out.shape[1], h // 2, 2, wd // 2, 2).max(axis=(3, 5))
    flat = x.reshape(x.shape[0], -1)  # channel-major, as PyTorch's view
    return flat @ sd["classifier.weight"].T.astype(np.float64) + sd["classifier.bias"]


def test_safetensors_without_torch_matches_numpy_reference(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    rng = np.random.default_rng(3)
    sd = _numpy_vgg_state_dict(rng)
    path = tmp_path / "vgg.safetensors"
    st.save_file({f"model.{k}": v for k, v in sd.items()}, str(path))  # a wrapper's prefix
    model = nets.VGG(cfg=TINY_VGG_CFG)
    params = weights.load_params(model, path, (8, 8, 3))
    np.testing.assert_array_equal(params["features_0"]["kernel"], sd["features.0.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["features_1"]["var"], sd["features.1.running_var"])
    np.testing.assert_array_equal(params["classifier"]["kernel"], sd["classifier.weight"].T)
    x = rng.uniform(0, 1, (4, 8, 8, 3)).astype(np.float32)
    want = _numpy_vgg_logits(sd, x, model.mean, model.std)
    assert 0.1 < np.abs(want).max() < 30
    got = np.asarray(model.apply({"params": params}, x))
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


def test_clean_state_dict_unwraps_strips_and_drops_counters():
    w = np.ones((2, 2), np.float64)
    raw = {"net": {"module.model.fc.weight": w, "module.model.bn.num_batches_tracked": np.array(3)}, "acc": 93.1}
    sd = weights.clean_state_dict(raw)
    assert list(sd) == ["fc.weight"] and sd["fc.weight"].dtype == np.float32
    # A prefix only some keys share is kept.
    assert set(weights.clean_state_dict({"model.a": w, "b": w})) == {"model.a", "b"}
    with pytest.raises(ValueError, match="not a state dict"):
        weights.clean_state_dict({"epoch": 3, "acc": 0.5})
    with pytest.raises(ValueError, match="empty"):
        weights.clean_state_dict({})


def test_mismatches_are_all_named(tmp_path):
    model = nets.VGG(cfg=TINY_VGG_CFG)
    sd = _numpy_vgg_state_dict(np.random.default_rng(0))
    weights.import_params(model, sd, (8, 8, 3))  # fits as is
    bad = dict(sd)
    del bad["features.4.bias"]
    bad["features.9.weight"] = np.zeros(3, np.float32)
    bad["classifier.weight"] = np.zeros((10, 31), np.float32)
    with pytest.raises(ValueError) as e:
        weights.import_params(model, bad, (8, 8, 3))
    msg = str(e.value)
    assert "missing keys (1): ['features.4.bias']" in msg
    assert "unexpected keys (1): ['features.9.weight']" in msg
    assert "classifier.weight: file has (10, 31), model needs (10, 32)" in msg
    # A checkpoint for another number of classes fails on the head, naming it.
    with pytest.raises(ValueError, match=r"classifier.weight: file has \(10, 32\), model needs \(7, 32\)"):
        weights.import_params(nets.VGG(cfg=TINY_VGG_CFG, num_classes=7), sd, (8, 8, 3))


def test_bad_paths_and_inputs_raise_clear_errors(tmp_path):
    model = nets.VGG(cfg=TINY_VGG_CFG)
    with pytest.raises(FileNotFoundError, match="Nothing is downloaded: put the PyTorch state_dict there") as e:
        weights.load_params(model, tmp_path / "missing" / "Standard.pt", (8, 8, 3))
    assert str(tmp_path / "missing" / "Standard.pt") in str(e.value)
    with pytest.raises(FileNotFoundError, match="safetensors"):
        weights.load_state_dict(tmp_path / "nope.safetensors")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="cannot tell the format"):
        weights.load_state_dict(tmp_path / "w.npz")
    sd = _numpy_vgg_state_dict(np.random.default_rng(0))
    with pytest.raises(ValueError, match="rnd_jax.nets"):
        from rnd_jax.models import DigitsCNN

        weights.import_params(DigitsCNN(), sd, (8, 8, 1))
    with pytest.raises(ValueError, match="input_shape"):
        weights.import_params(model, sd, (1, 8, 8, 3))
    with pytest.raises(ValueError, match="state dict"):
        weights.import_params(model, [1, 2], (8, 8, 3))
