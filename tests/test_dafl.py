"""Tests of kd_jax.distillers.dafl: the generator against a PyTorch
transcription of the authors' `Generator`, and one DAFL step against float64
NumPy transcriptions of `DAFL-train.py`'s losses (values, and the parameter
updates against central finite differences)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax import models
from kd_jax import train
from kd_jax.distillers import dafl


def np_softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def np_mlp(params, x):
  """kd_jax MLP with one hidden layer: (logits, hidden activation)."""
  h = np.maximum(x.reshape(x.shape[0], -1) @ params["Dense_0"]["kernel"]
                 + params["Dense_0"]["bias"], 0)
  return h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"], h


def np_dafl_generator_loss(outputs_t, features_t, oh=1.0, ie=5.0, a=0.1):
  """DAFL-train.py's generator loss."""
  pred = outputs_t.argmax(1)
  logp = np.log(np_softmax(outputs_t))
  loss_one_hot = -logp[np.arange(len(pred)), pred].mean()
  loss_activation = -np.abs(features_t).mean()
  p = np_softmax(outputs_t).mean(0)
  loss_ie = (p * np.log10(p)).sum()
  return loss_one_hot * oh + loss_ie * ie + loss_activation * a, (
      loss_one_hot, loss_ie, loss_activation)


def np_kdloss(y, teacher_scores):
  """DAFL-train.py's kdloss: kl_div(log_softmax(y), softmax(t), sum) / B."""
  q = np_softmax(teacher_scores)
  return (q * (np.log(q) - np.log(np_softmax(y)))).sum() / y.shape[0]


CFG = dafl.DAFLConfig(batch_size=6, latent_dim=4, img_size=8, channels=1)


def _setup(lr_g=0.05, lr_s=0.1, dtype=jnp.float32):
  teacher = models.mnist.MLP(hidden=(6,), dropout=0.0, input_hw=None,
                             dtype=dtype)
  student = models.mnist.MLP(hidden=(5,), dropout=0.0, input_hw=None,
                             dtype=dtype)
  x = jnp.zeros((1, 8, 8, 1))
  tv = teacher.init(jax.random.key(1), x)
  gen = dafl.Generator(img_size=8, channels=1, latent_dim=4, dtype=dtype)
  task = dafl.DAFLTask(
      generator=gen, teacher_apply=teacher, student=student,
      student_init=lambda k: student.init(k, x), gen_tx=optax.sgd(lr_g),
      student_tx=optax.sgd(lr_s), cfg=CFG)
  return task, tv


def _f64(tree):
  return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)


def test_one_step_matches_numpy_losses_and_finite_differences():
  lr_g, lr_s = 0.05, 0.1
  with jax.enable_x64(True):
    task, tv = _setup(lr_g, lr_s, jnp.float64)
    tv = _f64(tv)
    state = task.init_state(jax.random.key(0))
    state = state.replace(
        generator=state.generator.replace(
            params=_f64(state.generator.params),
            batch_stats=_f64(state.generator.batch_stats)),
        student=state.student.replace(params=_f64(state.student.params)))
    new, metrics = jax.jit(task.train_step)(state, tv, task.batch(0))
    g0 = state.generator
    z = jax.random.normal(jax.random.fold_in(g0.rng, g0.step),
                          (CFG.batch_size, CFG.latent_dim), jnp.float64)

    def images(gparams):
      out, _ = task.generator.apply(
          {"params": gparams, "batch_stats": g0.batch_stats}, z, train=True,
          mutable=["batch_stats"])
      return np.asarray(out, np.float64)

    tp = jax.tree_util.tree_map(np.asarray, tv["params"])
    imgs = images(g0.params)
    t_logits, t_feat = np_mlp(tp, imgs)
    g_ref, (oh, ie, act) = np_dafl_generator_loss(t_logits, t_feat)
    sp = jax.tree_util.tree_map(np.asarray, state.student.params)
    kd_ref = np_kdloss(np_mlp(sp, imgs)[0], t_logits)
    for k, v in (("one_hot", oh), ("entropy", ie), ("activation", act),
                 ("generator_loss", g_ref), ("kd", kd_ref)):
      np.testing.assert_allclose(metrics[k], v, rtol=1e-9, err_msg=k)

    # Student: SGD step = -lr * grad of the NumPy KD loss (full FD).
    flat_s, unravel_s = jax.flatten_util.ravel_pytree(sp)
    f_s = lambda v: np_kdloss(np_mlp(jax.tree_util.tree_map(
        np.asarray, unravel_s(v)), imgs)[0], t_logits)
    fd = np.array([(f_s(flat_s + h) - f_s(flat_s - h)) / 2e-6
                   for h in 1e-6 * np.eye(flat_s.size)])
    step_s = (flat_s - jax.flatten_util.ravel_pytree(new.student.params)[0]) / lr_s
    np.testing.assert_allclose(step_s, fd, rtol=1e-6, atol=1e-9)

    # Generator: directional derivatives of the NumPy generator loss through
    # the generator and the teacher match the step's update.
    flat_g, unravel_g = jax.flatten_util.ravel_pytree(g0.params)
    step_g = (flat_g - jax.flatten_util.ravel_pytree(
        new.generator.params)[0]) / lr_g
    f_g = lambda v: np_dafl_generator_loss(*np_mlp(tp, images(unravel_g(v))))[0]
    rng = np.random.default_rng(0)
    for _ in range(3):
      d = rng.standard_normal(flat_g.size)
      d /= np.linalg.norm(d)
      fd_dir = (f_g(flat_g + 1e-6 * d) - f_g(flat_g - 1e-6 * d)) / 2e-6
      np.testing.assert_allclose(step_g @ d, fd_dir, rtol=1e-5, atol=1e-9)

  # Both parameter sets moved; the generator's BN statistics were updated.
  assert np.abs(step_s).max() > 0 and np.abs(step_g).max() > 0
  assert not np.allclose(new.generator.batch_stats["bn1"]["mean"],
                         g0.batch_stats["bn1"]["mean"])
  assert int(new.step) == 1 and int(new.generator.step) == 1


def test_generator_matches_torch_transcription():
  torch = pytest.importorskip("torch")
  tnn = torch.nn

  class TorchGenerator(tnn.Module):   # DAFL-train.py Generator, img_size 8
    def __init__(self, img_size=8, latent_dim=4, channels=1):
      super().__init__()
      self.init_size = img_size // 4
      self.l1 = tnn.Sequential(tnn.Linear(latent_dim, 128 * self.init_size ** 2))
      self.conv_blocks0 = tnn.Sequential(tnn.BatchNorm2d(128))
      self.conv_blocks1 = tnn.Sequential(
          tnn.Conv2d(128, 128, 3, stride=1, padding=1),
          tnn.BatchNorm2d(128, 0.8), tnn.LeakyReLU(0.2, inplace=True))
      self.conv_blocks2 = tnn.Sequential(
          tnn.Conv2d(128, 64, 3, stride=1, padding=1),
          tnn.BatchNorm2d(64, 0.8), tnn.LeakyReLU(0.2, inplace=True),
          tnn.Conv2d(64, channels, 3, stride=1, padding=1), tnn.Tanh(),
          tnn.BatchNorm2d(channels, affine=False))

    def forward(self, z):
      out = self.l1(z)
      out = out.view(out.shape[0], 128, self.init_size, self.init_size)
      img = self.conv_blocks0(out)
      img = tnn.functional.interpolate(img, scale_factor=2)
      img = self.conv_blocks1(img)
      img = tnn.functional.interpolate(img, scale_factor=2)
      return self.conv_blocks2(img)

  torch.manual_seed(0)
  ref = TorchGenerator().double()
  for m in ref.modules():          # non-trivial affine BN parameters
    if isinstance(m, tnn.BatchNorm2d) and m.affine:
      with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
  conv = lambda c: {"kernel": c.weight.detach().numpy().transpose(2, 3, 1, 0),
                    "bias": c.bias.detach().numpy()}
  bnp = lambda b: {"scale": b.weight.detach().numpy(),
                   "bias": b.bias.detach().numpy()}
  params = {"l1": {"kernel": ref.l1[0].weight.detach().numpy().T,
                   "bias": ref.l1[0].bias.detach().numpy()},
            "bn0": bnp(ref.conv_blocks0[0]), "conv1": conv(ref.conv_blocks1[0]),
            "bn1": bnp(ref.conv_blocks1[1]), "conv2": conv(ref.conv_blocks2[0]),
            "bn2": bnp(ref.conv_blocks2[1]), "conv3": conv(ref.conv_blocks2[3])}
  z = np.random.default_rng(1).standard_normal((5, 4))
  with torch.no_grad():
    want = ref(torch.from_numpy(z)).numpy().transpose(0, 2, 3, 1)
  gen = dafl.Generator(img_size=8, channels=1, latent_dim=4)
  v = jax.jit(lambda k: gen.init(k, jnp.zeros((2, 4))))(jax.random.key(0))
  params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)
  got, upd = jax.jit(lambda p, s, z_: gen.apply(
      {"params": p, "batch_stats": s}, z_, train=True,
      mutable=["batch_stats"]))(params, v["batch_stats"], jnp.asarray(z))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # Running means follow torch's momentum 0.1 (running vars differ by the
  # unbiased factor, a documented kd_jax BatchNorm difference).
  np.testing.assert_allclose(upd["batch_stats"]["bn1"]["mean"],
                             ref.conv_blocks1[1].running_mean.numpy(),
                             rtol=1e-4, atol=1e-6)


def test_task_protocol_scans_and_evaluates():
  task, tv = _setup()
  state = task.init_state(jax.random.key(3))
  multi = jax.jit(train.make_multi_step(task.train_step))
  chunk = jax.tree_util.tree_map(lambda *a: np.stack(a),
                                 *[task.batch(i) for i in range(3)])
  state2, metrics = multi(state, tv, chunk)
  assert int(state2.step) == 3
  assert set(task.report_fields) <= set(metrics)
  assert metrics["kd"].shape == (3,)
  # Same three steps one at a time: identical (noise is a function of step).
  step = jax.jit(task.train_step)
  s = state
  for i in range(3):
    s, _ = step(s, tv, task.batch(i))
  np.testing.assert_allclose(
      jax.flatten_util.ravel_pytree(s.student.params)[0],
      jax.flatten_util.ravel_pytree(state2.student.params)[0], rtol=1e-5,
      atol=1e-6)
  imgs = jax.jit(lambda st: dafl.generate(task.generator, st,
                                         jax.random.key(0), 5, 4))(state2)
  assert imgs.shape == (5, 8, 8, 1) and np.all(np.isfinite(imgs))
  ev = jax.jit(task.eval_step)(state2, {
      "image": jnp.zeros((4, 8, 8, 1)), "label": jnp.arange(4)})
  assert float(ev["count"]) == 4.0


@pytest.mark.slow  # ~30 s on 2 loaded cores (compiles the generator under pmap)
def test_pmap_step_runs_and_keeps_replicas_in_sync():
  n = jax.local_device_count()
  if n < 2:
    pytest.skip("needs several devices")
  task, tv = _setup()
  task = dafl.DAFLTask(**{**task.__dict__, "axis_name": "d"})
  state = task.init_state(jax.random.key(4))
  rep = lambda t: jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), t)
  fn = jax.pmap(task.train_step, axis_name="d", devices=jax.local_devices()[:2])
  new, metrics = fn(rep(state), rep(tv), rep(task.batch(0)))
  for leaf in jax.tree_util.tree_leaves((new, metrics)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      np.testing.assert_allclose(leaf[0], leaf[1], rtol=1e-6, atol=1e-7)


def test_config_and_feature_errors():
  with pytest.raises(ValueError, match="batch_size"):
    dafl.DAFLConfig(batch_size=0)
  with pytest.raises(ValueError, match="multiple of 4"):
    dafl.Generator(img_size=30).init(jax.random.key(0), jnp.zeros((1, 100)))
  task, tv = _setup()
  bad = dafl.DAFLTask(**{**task.__dict__,
                         "cfg": dafl.DAFLConfig(batch_size=6, latent_dim=4,
                                                img_size=8,
                                                feature_key="missing")})
  with pytest.raises(KeyError, match="missing"):
    jax.eval_shape(bad.train_step, bad.init_state(jax.random.key(0)), tv)
