"""Engine support of self-distillation: the 'pair' view (CS-KD) and
teacher-free terms in `make_train_step` (BYOT, CS-KD, Tf-KD_reg).

The CS-KD step is compared with the authors' training step run in PyTorch
(alinlab/cs-kd `train.py::train` with `--cls`: a forward on the anchors, a
`torch.no_grad()` train-mode forward on the partners, `KDLoss`, SGD with
momentum and weight decay) on a tiny network with the same weights.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax import distillers as D
from kd_jax import train

K = 5


class Tiny(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    h = nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)), use_bias=False)(x)
    h = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                     epsilon=1e-5)(h)
    h = nn.relu(h)
    f = jnp.mean(h, axis=(1, 2))
    return nn.Dense(K)(f), {"stages": [h], "pooled": f}


def _batch(seed, n=6):
  rs = np.random.RandomState(seed)
  return {"image": rs.randn(n, 6, 6, 1).astype(np.float32),
          "image_pair": rs.randn(n, 6, 6, 1).astype(np.float32),
          "label": rs.randint(0, K, n).astype(np.int32)}


def _torch_reference(variables, batches, *, lr, wd, temp, lamda):
  torch = pytest.importorskip("torch")
  tnn = torch.nn
  F = torch.nn.functional

  class Net(tnn.Module):
    def __init__(self):
      super().__init__()
      self.conv = tnn.Conv2d(1, 4, 3, padding=1, bias=False)
      self.bn = tnn.BatchNorm2d(4)
      self.fc = tnn.Linear(4, K)

    def forward(self, x):
      h = F.relu(self.bn(self.conv(x)))
      return self.fc(h.mean((2, 3)))

  net = Net().double()
  p = variables["params"]
  with torch.no_grad():
    net.conv.weight.copy_(torch.tensor(np.asarray(
        p["Conv_0"]["kernel"]).transpose(3, 2, 0, 1)))
    net.bn.weight.copy_(torch.tensor(np.asarray(p["BatchNorm_0"]["scale"])))
    net.bn.bias.copy_(torch.tensor(np.asarray(p["BatchNorm_0"]["bias"])))
    net.fc.weight.copy_(torch.tensor(np.asarray(p["Dense_0"]["kernel"]).T))
    net.fc.bias.copy_(torch.tensor(np.asarray(p["Dense_0"]["bias"])))
  opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9,
                        weight_decay=wd)

  def kdloss(inp, target):  # the authors' KDLoss
    log_p = torch.log_softmax(inp / temp, dim=1)
    q = torch.softmax(target / temp, dim=1)
    return F.kl_div(log_p, q, reduction="sum") * temp ** 2 / inp.size(0)

  losses = []
  net.train()
  for b in batches:
    # The authors' batch: anchors then partners, split in halves.
    inputs = torch.tensor(np.concatenate([b["image"], b["image_pair"]])
                          .transpose(0, 3, 1, 2), dtype=torch.float64)
    bs = inputs.size(0)
    targets_ = torch.tensor(b["label"], dtype=torch.long)
    outputs = net(inputs[:bs // 2])
    loss = torch.mean(F.cross_entropy(outputs, targets_))
    with torch.no_grad():
      outputs_cls = net(inputs[bs // 2:])
    loss = loss + lamda * kdloss(outputs, outputs_cls.detach())
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(float(loss.detach()))
  return net, losses


def test_cskd_step_matches_the_authors_training_step():
  model = Tiny()
  batches = [_batch(i) for i in range(3)]
  v = model.init(jax.random.PRNGKey(0), batches[0]["image"])
  lr, wd, temp, lamda = 0.1, 1e-4, 4.0, 1.0
  obj = train.Objective(ce_weight=1.0, terms=(train.Term(
      "cskd", lamda, distiller=D.create("cskd", temperature=temp)),))
  tx = optax.chain(optax.add_decayed_weights(wd),
                   optax.sgd(lr, momentum=0.9))
  state = train.create_train_state(v, tx, rng=jax.random.PRNGKey(1),
                                   distiller_params={"cskd": {}},
                                   distiller_state={"cskd": {}})
  step = jax.jit(train.make_train_step(model, tx, objective=obj))
  got = []
  for b in batches:
    state, m = step(state, b)
    got.append(float(m["loss"]))
  net, want = _torch_reference(v, batches, lr=lr, wd=wd, temp=temp,
                               lamda=lamda)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  p = state.params
  np.testing.assert_allclose(
      np.asarray(p["Conv_0"]["kernel"]).transpose(3, 2, 0, 1),
      net.conv.weight.detach().numpy(), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(p["Dense_0"]["kernel"]).T,
                             net.fc.weight.detach().numpy(), rtol=1e-4,
                             atol=1e-6)
  # Running mean after two train-mode forwards per step (anchors, partners).
  np.testing.assert_allclose(
      np.asarray(state.batch_stats["BatchNorm_0"]["mean"]),
      net.bn.running_mean.numpy(), rtol=1e-4, atol=1e-6)


def test_teacher_free_train_step():
  model = Tiny()
  b = _batch(5, n=8)
  v = model.init(jax.random.PRNGKey(0), b["image"])
  terms = (train.Term("tfkd", 0.5, distiller=D.create("tfkd")),
           train.Term("cskd", 1.0, distiller=D.create("cskd")))
  obj = train.Objective(ce_weight=0.5, terms=terms)
  dp, ds = D.init_distillers(obj, jax.random.PRNGKey(2), student_apply=model,
                             teacher_apply=None, student_variables=v,
                             teacher_variables=None, batch=b)
  tx = optax.adam(1e-2)
  state = train.create_train_state(v, tx, rng=jax.random.PRNGKey(3),
                                   distiller_params=dp, distiller_state=ds)
  step = jax.jit(train.make_train_step(model, tx, objective=obj))
  vals = []
  for _ in range(4):
    state, m = step(state, b)
    vals.append(float(m["loss"]))
    assert set(m) >= {"ce", "tfkd", "cskd", "loss", "top1"}
  assert vals[-1] < vals[0]
  with pytest.raises(ValueError, match="without KD terms"):
    train.make_train_step(model, tx, objective=train.Objective(
        terms=(train.Term("kd", 1.0),)))
  with pytest.raises(KeyError, match="image_pair"):
    step(state, {k: b[k] for k in ("image", "label")})
