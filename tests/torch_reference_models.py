"""PyTorch definitions of the reference CNN families, written for the tests.

Written from the architecture descriptions of HobbitLong/RepDistiller
(`models/resnet.py`, `wrn.py`, `vgg.py`, `resnetv2.py`), megvii-research/
mdistiller (`mdistiller/models/cifar/*`, `imagenet/resnet.py`) and torchvision
(`models/resnet.py`): same layers, same module names (hence the same
`state_dict` keys as the released checkpoints) and the same feature lists.
Every `forward` returns `(logits, {'feats', 'preact_feats', 'pooled'})` in
NCHW. Only imported by tests when torch is installed.
"""

from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F


def conv3x3(cin, cout, stride=1):
  return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def _kaiming_bn_init(module):
  for m in module.modules():
    if isinstance(m, nn.Conv2d):
      nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(m, nn.BatchNorm2d):
      nn.init.ones_(m.weight)
      nn.init.zeros_(m.bias)


def _projection(cin, cout, stride):
  return nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                       nn.BatchNorm2d(cout))


# --------------------------------------------------------------------------
# CIFAR ResNet (RepDistiller / mdistiller resnet.py), basic blocks only.
# --------------------------------------------------------------------------


class CifarBasicBlock(nn.Module):

  def __init__(self, cin, planes, stride=1, downsample=None):
    super().__init__()
    self.conv1 = conv3x3(cin, planes, stride)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = conv3x3(planes, planes)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    skip = x if self.downsample is None else self.downsample(x)
    self.preact = y + skip
    return F.relu(self.preact)


class CifarResNet(nn.Module):

  def __init__(self, depth, widths, num_classes=100):
    super().__init__()
    n = (depth - 2) // 6
    self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(widths[0])
    cin = widths[0]
    for s, (planes, stride) in enumerate(zip(widths[1:], (1, 2, 2)), 1):
      blocks = []
      for i in range(n):
        st = stride if i == 0 else 1
        down = (_projection(cin, planes, st)
                if (st != 1 or cin != planes) else None)
        blocks.append(CifarBasicBlock(cin, planes, st, down))
        cin = planes
      setattr(self, f"layer{s}", nn.Sequential(*blocks))
    self.fc = nn.Linear(widths[3], num_classes)
    _kaiming_bn_init(self)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    feats, pre = [x], [x]
    for s in (1, 2, 3):
      layer = getattr(self, f"layer{s}")
      x = layer(x)
      feats.append(x)
      pre.append(layer[-1].preact)
    pooled = F.avg_pool2d(x, 8).flatten(1)
    return self.fc(pooled), {"feats": feats, "preact_feats": pre,
                             "pooled": pooled}


# --------------------------------------------------------------------------
# Wide ResNet (RepDistiller / mdistiller wrn.py), dropout 0.
# --------------------------------------------------------------------------


class WideBlock(nn.Module):

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(cin)
    self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
    self.equal = cin == cout
    self.convShortcut = (None if self.equal else
                         nn.Conv2d(cin, cout, 1, stride=stride, bias=False))

  def forward(self, x):
    a = F.relu(self.bn1(x))
    y = self.conv2(F.relu(self.bn2(self.conv1(a))))
    return (x if self.equal else self.convShortcut(a)) + y


class NetworkBlock(nn.Module):

  def __init__(self, n, cin, cout, stride):
    super().__init__()
    self.layer = nn.Sequential(*[
        WideBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
        for i in range(n)])

  def forward(self, x):
    return self.layer(x)


class WideResNet(nn.Module):

  def __init__(self, depth, widen_factor, num_classes=100):
    super().__init__()
    w = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
    n = (depth - 4) // 6
    self.conv1 = nn.Conv2d(3, w[0], 3, padding=1, bias=False)
    self.block1 = NetworkBlock(n, w[0], w[1], 1)
    self.block2 = NetworkBlock(n, w[1], w[2], 2)
    self.block3 = NetworkBlock(n, w[2], w[3], 2)
    self.bn1 = nn.BatchNorm2d(w[3])
    self.fc = nn.Linear(w[3], num_classes)
    _kaiming_bn_init(self)
    nn.init.zeros_(self.fc.bias)

  def forward(self, x):
    f0 = self.conv1(x)
    f1 = self.block1(f0)
    f2 = self.block2(f1)
    f3 = self.block3(f2)
    pooled = F.avg_pool2d(F.relu(self.bn1(f3)), 8).flatten(1)
    pre = [f0, self.block2.layer[0].bn1(f1), self.block3.layer[0].bn1(f2),
           self.bn1(f3)]
    return self.fc(pooled), {"feats": [f0, f1, f2, f3], "preact_feats": pre,
                             "pooled": pooled}


# --------------------------------------------------------------------------
# VGG with BatchNorm (RepDistiller / mdistiller vgg.py, vggN_bn).
# --------------------------------------------------------------------------

VGG_CFGS = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3],
    "vgg19": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


class VGG(nn.Module):

  def __init__(self, cfg, num_classes=100):
    super().__init__()
    cin = 3
    for b, widths in enumerate(cfg):
      mods = []
      for v in widths:
        mods += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v),
                 nn.ReLU()]
        cin = v
      setattr(self, f"block{b}", nn.Sequential(*mods[:-1]))
    self.classifier = nn.Linear(512, num_classes)
    _kaiming_bn_init(self)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.zeros_(m.bias)
    nn.init.normal_(self.classifier.weight, 0, 0.01)
    nn.init.zeros_(self.classifier.bias)

  def forward(self, x):
    feats, pre = [], []
    for b in range(5):
      if b in (1, 2, 3):
        x = F.max_pool2d(x, 2, 2)
      y = getattr(self, f"block{b}")(x)
      x = F.relu(y)
      feats.append(x)
      pre.append(x if b == 0 else y)
    pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
    return self.classifier(pooled), {"feats": feats, "preact_feats": pre,
                                     "pooled": pooled}


# --------------------------------------------------------------------------
# ResNet18/50: torchvision (ImageNet stem) and RepDistiller resnetv2 (CIFAR).
# --------------------------------------------------------------------------


class Basic(nn.Module):
  expansion = 1

  def __init__(self, cin, planes, stride, proj, proj_name):
    super().__init__()
    self.conv1 = conv3x3(cin, planes, stride)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = conv3x3(planes, planes)
    self.bn2 = nn.BatchNorm2d(planes)
    self.proj_name = proj_name
    setattr(self, proj_name, proj if proj is not None else nn.Sequential())

  def forward(self, x):
    y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    self.preact = y + getattr(self, self.proj_name)(x)
    return F.relu(self.preact)


class Bottle(nn.Module):
  expansion = 4

  def __init__(self, cin, planes, stride, proj, proj_name):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = conv3x3(planes, planes, stride)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.proj_name = proj_name
    setattr(self, proj_name, proj if proj is not None else nn.Sequential())

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    self.preact = y + getattr(self, self.proj_name)(x)
    return F.relu(self.preact)


class ResNet(nn.Module):

  def __init__(self, block, layers, num_classes, cifar):
    super().__init__()
    self.cifar = cifar
    if cifar:
      self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
    else:
      self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    proj_name = "shortcut" if cifar else "downsample"
    cin = 64
    for s, (planes, n) in enumerate(zip((64, 128, 256, 512), layers), 1):
      blocks = []
      for i in range(n):
        st = (1 if s == 1 else 2) if i == 0 else 1
        cout = planes * block.expansion
        proj = _projection(cin, cout, st) if (st != 1 or cin != cout) else None
        blocks.append(block(cin, planes, st, proj, proj_name))
        cin = cout
      setattr(self, f"layer{s}", nn.Sequential(*blocks))
    head = nn.Linear(512 * block.expansion, num_classes)
    setattr(self, "linear" if cifar else "fc", head)
    self.head = "linear" if cifar else "fc"
    _kaiming_bn_init(self)

  def forward(self, x):
    stem = self.bn1(self.conv1(x))
    x = F.relu(stem)
    feats, pre = [x], [x if self.cifar else stem]
    if not self.cifar:
      x = F.max_pool2d(x, 3, 2, 1)
    for s in (1, 2, 3, 4):
      layer = getattr(self, f"layer{s}")
      x = layer(x)
      feats.append(x)
      pre.append(layer[-1].preact)
    pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
    return getattr(self, self.head)(pooled), {
        "feats": feats, "preact_feats": pre, "pooled": pooled}


def build(name: str, num_classes: int) -> nn.Module:
  """The reference torch model for a kd_jax model name."""
  small, x4 = [16, 16, 32, 64], [32, 64, 128, 256]
  resnets = {"resnet8": (8, small), "resnet14": (14, small),
             "resnet20": (20, small), "resnet32": (32, small),
             "resnet44": (44, small), "resnet56": (56, small),
             "resnet110": (110, small), "resnet8x4": (8, x4),
             "resnet32x4": (32, x4)}
  if name in resnets:
    return CifarResNet(*resnets[name], num_classes=num_classes)
  if name.startswith("wrn_"):
    _, depth, k = name.split("_")
    return WideResNet(int(depth), int(k), num_classes=num_classes)
  if name in VGG_CFGS:
    return VGG(VGG_CFGS[name], num_classes=num_classes)
  big = {"resnet18": (Basic, [2, 2, 2, 2], False),
         "resnet34": (Basic, [3, 4, 6, 3], False),
         "resnet50": (Bottle, [3, 4, 6, 3], False),
         "resnet18_cifar": (Basic, [2, 2, 2, 2], True),
         "resnet50_cifar": (Bottle, [3, 4, 6, 3], True)}
  if name in big:
    block, layers, cifar = big[name]
    return ResNet(block, layers, num_classes, cifar)
  raise KeyError(name)


def randomize_bn_(model: nn.Module, generator: torch.Generator) -> None:
  """Random BN affine params and running stats, so eval mode is non-trivial."""
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, nn.BatchNorm2d):
        c = m.num_features
        m.weight.copy_(1 + 0.2 * torch.randn(c, generator=generator))
        m.bias.copy_(0.2 * torch.randn(c, generator=generator))
        m.running_mean.copy_(0.2 * torch.randn(c, generator=generator))
        m.running_var.copy_(0.5 + torch.rand(c, generator=generator))
