"""PyTorch reference definitions for tests/test_models_mobile.py (needs torch).

Re-statements of the reference definitions the Flax models must match, with
the same module names (hence the same ``state_dict`` keys), the same layers and
the same forward pass; each forward returns
``(logits, {'stages', 'preact_stages', 'pooled'})`` in NCHW, built the way the
reference's ``is_feat=True`` (and ``preact=True``) lists are built.

* ``MobileNetV2Half``: HobbitLong/RepDistiller ``models/mobilenetv2.py``
  ``mobile_half`` (= mdistiller ``mdistiller/models/cifar/mobilenetv2.py``).
* ``ShuffleV1``: RepDistiller ``models/ShuffleNetv1.py``.
* ``ShuffleV2``: RepDistiller ``models/ShuffleNetv2.py`` (net_size 1).
* ``MobileNetV1``: mdistiller ``mdistiller/models/imagenet/mobilenetv1.py``
  (used for the parameter count only; its feature list has no stem).
* ``VisionTransformer``: timm 0.6.5 ``VisionTransformer`` as used by
  Hao840/OFAKD (``custom_forward/vision_transformer.py``: the features are the
  outputs of every block, the pooled vector is the class token after the final
  LayerNorm), ``qkv_bias=True``, LayerNorm eps 1e-6, exact GELU.

Only imported when torch is available.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


# --------------------------------------------------------------------------
# MobileNetV2 (CIFAR, RepDistiller mobile_half)
# --------------------------------------------------------------------------
def _conv_bn(inp, oup, stride):
  return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False),
                       nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


def _conv_1x1_bn(inp, oup):
  return nn.Sequential(nn.Conv2d(inp, oup, 1, 1, 0, bias=False),
                       nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


class InvertedResidual(nn.Module):

  def __init__(self, inp, oup, stride, expand_ratio):
    super().__init__()
    self.use_res_connect = stride == 1 and inp == oup
    hid = inp * expand_ratio
    self.conv = nn.Sequential(
        nn.Conv2d(inp, hid, 1, 1, 0, bias=False), nn.BatchNorm2d(hid),
        nn.ReLU(inplace=True),
        nn.Conv2d(hid, hid, 3, stride, 1, groups=hid, bias=False),
        nn.BatchNorm2d(hid), nn.ReLU(inplace=True),
        nn.Conv2d(hid, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup))

  def forward(self, x):
    if self.use_res_connect:
      return x + self.conv(x)
    return self.conv(x)


class MobileNetV2Half(nn.Module):

  def __init__(self, num_classes=100, T=6, width_mult=0.5):
    super().__init__()
    setting = [[1, 16, 1, 1], [T, 24, 2, 1], [T, 32, 3, 2], [T, 64, 4, 2],
               [T, 96, 3, 1], [T, 160, 3, 2], [T, 320, 1, 1]]
    input_channel = int(32 * width_mult)
    self.conv1 = _conv_bn(3, input_channel, 2)
    self.blocks = nn.ModuleList([])
    for t, c, n, s in setting:
      output_channel = int(c * width_mult)
      layers = []
      for stride in [s] + [1] * (n - 1):
        layers.append(InvertedResidual(input_channel, output_channel, stride,
                                       t))
        input_channel = output_channel
      self.blocks.append(nn.Sequential(*layers))
    self.last_channel = (int(1280 * width_mult) if width_mult > 1.0
                         else 1280)
    self.conv2 = _conv_1x1_bn(input_channel, self.last_channel)
    self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
    self.avgpool = nn.AvgPool2d(32 // (32 // 2), ceil_mode=True)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
        m.weight.data.normal_(0, math.sqrt(2. / n))
      elif isinstance(m, nn.BatchNorm2d):
        m.weight.data.fill_(1)
        m.bias.data.zero_()
      elif isinstance(m, nn.Linear):
        m.weight.data.normal_(0, 0.01)
        m.bias.data.zero_()

  def forward(self, x):
    out = self.conv1(x)
    f0 = out
    out = self.blocks[1](self.blocks[0](out))
    f1 = out
    out = self.blocks[2](out)
    f2 = out
    out = self.blocks[4](self.blocks[3](out))
    f3 = out
    out = self.blocks[6](self.blocks[5](out))
    f4 = out
    out = self.conv2(out)
    out = self.avgpool(out).reshape(out.size(0), -1)
    pooled = out
    feats = [f0, f1, f2, f3, f4]
    # The reference ignores `preact`: the preact list is the same list.
    return self.classifier(out), {"stages": feats, "preact_stages": feats,
                                  "pooled": pooled}


# --------------------------------------------------------------------------
# ShuffleNetV1 (RepDistiller)
# --------------------------------------------------------------------------
class ShuffleBlock(nn.Module):

  def __init__(self, groups):
    super().__init__()
    self.groups = groups

  def forward(self, x):
    n, c, h, w = x.size()
    g = self.groups
    return x.view(n, g, c // g, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)


class V1Bottleneck(nn.Module):

  def __init__(self, in_planes, out_planes, stride, groups):
    super().__init__()
    self.stride = stride
    mid = int(out_planes / 4)
    g = 1 if in_planes == 24 else groups
    self.conv1 = nn.Conv2d(in_planes, mid, 1, groups=g, bias=False)
    self.bn1 = nn.BatchNorm2d(mid)
    self.shuffle1 = ShuffleBlock(g)
    self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1, groups=mid,
                           bias=False)
    self.bn2 = nn.BatchNorm2d(mid)
    self.conv3 = nn.Conv2d(mid, out_planes, 1, groups=groups, bias=False)
    self.bn3 = nn.BatchNorm2d(out_planes)
    self.shortcut = nn.Sequential()
    if stride == 2:
      self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.shuffle1(out)
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    res = self.shortcut(x)
    preact = torch.cat([out, res], 1) if self.stride == 2 else out + res
    return F.relu(preact), preact


class _Seq(nn.Sequential):
  """Sequential of blocks returning (out, preact); yields the last preact."""

  def forward(self, x):
    pre = None
    for m in self:
      r = m(x)
      x, pre = r if isinstance(r, tuple) else (r, None)
    return x, pre


class ShuffleV1(nn.Module):

  def __init__(self, num_classes=100):
    super().__init__()
    out_planes, num_blocks, groups = [240, 480, 960], [4, 8, 4], 3
    self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
    self.bn1 = nn.BatchNorm2d(24)
    self.in_planes = 24
    self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
    self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
    self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
    self.linear = nn.Linear(out_planes[2], num_classes)

  def _make_layer(self, out_planes, num_blocks, groups):
    layers = []
    for i in range(num_blocks):
      cat_planes = self.in_planes if i == 0 else 0
      layers.append(V1Bottleneck(self.in_planes, out_planes - cat_planes,
                                 stride=2 if i == 0 else 1, groups=groups))
      self.in_planes = out_planes
    return _Seq(*layers)

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    f0 = out
    out, f1p = self.layer1(out)
    f1 = out
    out, f2p = self.layer2(out)
    f2 = out
    out, f3p = self.layer3(out)
    f3 = out
    out = F.avg_pool2d(out, 4).view(out.size(0), -1)
    return self.linear(out), {"stages": [f0, f1, f2, f3],
                              "preact_stages": [f0, f1p, f2p, f3p],
                              "pooled": out}


# --------------------------------------------------------------------------
# ShuffleNetV2 (RepDistiller, net_size 1)
# --------------------------------------------------------------------------
class V2BasicBlock(nn.Module):

  def __init__(self, in_channels, split_ratio=0.5):
    super().__init__()
    self.ratio = split_ratio
    c = int(in_channels * split_ratio)
    self.conv1 = nn.Conv2d(c, c, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(c)
    self.conv2 = nn.Conv2d(c, c, 3, stride=1, padding=1, groups=c, bias=False)
    self.bn2 = nn.BatchNorm2d(c)
    self.conv3 = nn.Conv2d(c, c, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(c)
    self.shuffle = ShuffleBlock(2)

  def forward(self, x):
    c = int(x.size(1) * self.ratio)
    x1, x2 = x[:, :c], x[:, c:]
    out = F.relu(self.bn1(self.conv1(x2)))
    out = self.bn2(self.conv2(out))
    preact = self.bn3(self.conv3(out))
    out = F.relu(preact)
    preact = torch.cat([x1, preact], 1)
    out = torch.cat([x1, out], 1)
    return self.shuffle(out), preact


class V2DownBlock(nn.Module):

  def __init__(self, in_channels, out_channels):
    super().__init__()
    mid = out_channels // 2
    self.conv1 = nn.Conv2d(in_channels, in_channels, 3, stride=2, padding=1,
                           groups=in_channels, bias=False)
    self.bn1 = nn.BatchNorm2d(in_channels)
    self.conv2 = nn.Conv2d(in_channels, mid, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(mid)
    self.conv3 = nn.Conv2d(in_channels, mid, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(mid)
    self.conv4 = nn.Conv2d(mid, mid, 3, stride=2, padding=1, groups=mid,
                           bias=False)
    self.bn4 = nn.BatchNorm2d(mid)
    self.conv5 = nn.Conv2d(mid, mid, 1, bias=False)
    self.bn5 = nn.BatchNorm2d(mid)
    self.shuffle = ShuffleBlock(2)

  def forward(self, x):
    out1 = self.bn1(self.conv1(x))
    out1 = F.relu(self.bn2(self.conv2(out1)))
    out2 = F.relu(self.bn3(self.conv3(x)))
    out2 = self.bn4(self.conv4(out2))
    out2 = F.relu(self.bn5(self.conv5(out2)))
    return self.shuffle(torch.cat([out1, out2], 1))


class ShuffleV2(nn.Module):

  def __init__(self, num_classes=100):
    super().__init__()
    out_channels, num_blocks = (116, 232, 464, 1024), (3, 7, 3)
    self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
    self.bn1 = nn.BatchNorm2d(24)
    self.in_channels = 24
    self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
    self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
    self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
    self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], 1, 1, 0,
                           bias=False)
    self.bn2 = nn.BatchNorm2d(out_channels[3])
    self.linear = nn.Linear(out_channels[3], num_classes)

  def _make_layer(self, out_channels, num_blocks):
    layers = [V2DownBlock(self.in_channels, out_channels)]
    for _ in range(num_blocks):
      layers.append(V2BasicBlock(out_channels))
      self.in_channels = out_channels
    return _Seq(*layers)

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    f0 = out
    out, f1p = self.layer1(out)
    f1 = out
    out, f2p = self.layer2(out)
    f2 = out
    out, f3p = self.layer3(out)
    f3 = out
    out = F.relu(self.bn2(self.conv2(out)))
    out = F.avg_pool2d(out, 4).view(out.size(0), -1)
    return self.linear(out), {"stages": [f0, f1, f2, f3],
                              "preact_stages": [f0, f1p, f2p, f3p],
                              "pooled": out}


# --------------------------------------------------------------------------
# MobileNetV1 (mdistiller ImageNet)
# --------------------------------------------------------------------------
class MobileNetV1(nn.Module):

  def __init__(self, num_classes=1000):
    super().__init__()

    def conv_bn(inp, oup, stride):
      return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False),
                           nn.BatchNorm2d(oup), nn.ReLU(inplace=True))

    def conv_dw(inp, oup, stride):
      return nn.Sequential(
          nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False),
          nn.BatchNorm2d(inp), nn.ReLU(inplace=True),
          nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup),
          nn.ReLU(inplace=True))

    self.model = nn.Sequential(
        conv_bn(3, 32, 2), conv_dw(32, 64, 1), conv_dw(64, 128, 2),
        conv_dw(128, 128, 1), conv_dw(128, 256, 2), conv_dw(256, 256, 1),
        conv_dw(256, 512, 2), conv_dw(512, 512, 1), conv_dw(512, 512, 1),
        conv_dw(512, 512, 1), conv_dw(512, 512, 1), conv_dw(512, 512, 1),
        conv_dw(512, 1024, 2), conv_dw(1024, 1024, 1), nn.AvgPool2d(7))
    self.fc = nn.Linear(1024, num_classes)


# --------------------------------------------------------------------------
# ViT (timm 0.6.5 VisionTransformer, class token, as used by OFAKD)
# --------------------------------------------------------------------------
class PatchEmbed(nn.Module):

  def __init__(self, patch, dim):
    super().__init__()
    self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):

  def __init__(self, dim, num_heads):
    super().__init__()
    self.num_heads = num_heads
    self.scale = (dim // num_heads) ** -0.5
    self.qkv = nn.Linear(dim, dim * 3, bias=True)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads,
                              c // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
    x = (attn @ v).transpose(1, 2).reshape(b, n, c)
    return self.proj(x)


class Mlp(nn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1 = nn.Linear(dim, hidden)
    self.act = nn.GELU()
    self.fc2 = nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):

  def __init__(self, dim, num_heads, mlp_ratio=4.0):
    super().__init__()
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = Attention(dim, num_heads)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = Mlp(dim, int(dim * mlp_ratio))

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):

  def __init__(self, img_size=224, patch_size=16, embed_dim=192, depth=12,
               num_heads=3, num_classes=1000):
    super().__init__()
    n = (img_size // patch_size) ** 2
    self.patch_embed = PatchEmbed(patch_size, embed_dim)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.pos_embed = nn.Parameter(torch.randn(1, n + 1, embed_dim) * .02)
    self.blocks = nn.Sequential(
        *[Block(embed_dim, num_heads) for _ in range(depth)])
    self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
    self.head = nn.Linear(embed_dim, num_classes)

  def forward(self, x):
    x = self.patch_embed(x)
    x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
    x = x + self.pos_embed
    feats = []
    for blk in self.blocks:
      x = blk(x)
      feats.append(x)
    x = self.norm(x)
    pooled = x[:, 0]
    return self.head(pooled), {"stages": feats, "preact_stages": feats,
                               "pooled": pooled}
