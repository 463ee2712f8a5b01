"""Conditions beyond labels: vector conditioning reduces to labels for one-hot vectors, CFG on
vectors in one vmapped call, condition dropout, captions, and a text-conditioned run end to end
(its caption encodings seeded in the workdir, so no encoder is needed here; tests/text_test.py
checks the encoder itself)."""
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cli_test import assert_one_line_error, sample_refusal, tree_hash
import conftest
from jaxguide import conditioning
from jaxguide import guidance
from jaxguide.diffusion import losses
from jaxguide import pipeline
from jaxguide import models
from jaxguide.cli import sample_output
from jaxguide.cli import sample_request
from jaxguide.cli import train_job
from jaxguide.errors import ConfigError
from jaxguide.diffusion.sde import VPSDE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 4


def _label_and_vector_unets():
  """A label UNet and a vector UNet (cond_dim = K + 1) whose condition rows are the same."""
  label = models.UNet(num_classes=K, ch=8, ch_mult=(1, 2), groups=4)
  vector = models.UNet(num_classes=K, ch=8, ch_mult=(1, 2), groups=4, cond_dim=K + 1)
  x = jax.random.normal(jax.random.PRNGKey(0), (6, 8, 8, 1))
  t = jnp.linspace(0.1, 0.9, 6)
  p_label = jax.jit(label.init)(jax.random.key(1, impl="rbg"), x, t, jnp.zeros(6, jnp.int32))["params"]
  p_vector = dict(p_label)
  table = p_label["label_emb"]["embedding"]                 # (K + 1, E), row K is ∅
  del p_vector["label_emb"]
  p_vector["cond_emb"] = {"kernel": table, "bias": jnp.zeros(table.shape[1])}
  return label, vector, p_label, p_vector, x, t


def test_one_hot_vectors_reduce_to_labels():
  label, vector, p_label, p_vector, x, t = _label_and_vector_unets()
  onehot = conditioning.Conditions.one_hot(K)
  y = jnp.array([0, 1, 2, 3, K, 1])                           # the last-but-one is ∅
  c = jnp.asarray(onehot.table[:, 0])[jnp.minimum(y, K - 1)]
  c = jnp.where((y == K)[:, None], onehot.null, c)
  eps_l = lambda x, t, y: label.apply({"params": p_label}, x, t, y)
  eps_v = lambda x, t, c: vector.apply({"params": p_vector}, x, t, c)
  chex.assert_trees_all_close(jax.jit(eps_v)(x, t, c), jax.jit(eps_l)(x, t, y), atol=1e-5)
  # CFG on vectors with ∅ = the one-hot null vector is CFG on labels with ∅ = K (jitted with the
  # scale traced: one compile each, where eager UNets took minutes on a slow host).
  cfg_v = jax.jit(lambda s, x, t, c: guidance.classifier_free(eps_v, s, onehot.null)(x, t, c))
  cfg_l = jax.jit(lambda s, x, t, y: guidance.classifier_free(eps_l, s, K)(x, t, y))
  for s in (0.0, 1.0, 3.0):
    chex.assert_trees_all_close(cfg_v(s, x, t, c), cfg_l(s, x, t, y), atol=1e-5)


def test_vector_cfg_one_call_and_endpoints():
  """s = 0 is the null prediction, s = 1 the conditional one; both passes are one network call."""
  d, b = 5, 6
  calls = []
  w = jax.random.normal(jax.random.PRNGKey(2), (d, 3))

  def eps(x, t, c):
    calls.append(c.shape)
    return x * t[:, None] + jnp.tanh(c @ w)

  x = jax.random.normal(jax.random.PRNGKey(3), (b, 3))
  t = jnp.full((b,), 0.5)
  c = jax.random.normal(jax.random.PRNGKey(4), (b, d))
  null = jax.random.normal(jax.random.PRNGKey(5), (d,))
  out0 = guidance.classifier_free(eps, 0.0, null)(x, t, c)
  assert calls == [(b, d)]     # one trace, vmapped over the stacked [c, ∅] axis
  chex.assert_trees_all_close(out0, eps(x, t, jnp.broadcast_to(null, c.shape)), atol=1e-6)
  chex.assert_trees_all_close(guidance.classifier_free(eps, 1.0, null)(x, t, c), eps(x, t, c),
                              atol=1e-6)
  s = 2.5
  want = eps(x, t, jnp.broadcast_to(null, c.shape)) + s * (eps(x, t, c) - eps(x, t, jnp.broadcast_to(null, c.shape)))
  chex.assert_trees_all_close(guidance.classifier_free(eps, s, null)(x, t, c), want, atol=1e-5)
  # negative guidance on vectors: the negative vector in ∅'s place; compose with one condition is CFG.
  neg = jax.random.normal(jax.random.PRNGKey(6), (d,))
  chex.assert_trees_all_close(guidance.negative(eps, s, neg)(x, t, c),
                              guidance.classifier_free(eps, s, neg)(x, t, c), atol=1e-6)
  # CFG++ called as an ε-function is CFG at λ; APG with η = 1 and no bound is CFG (vector ∅ both).
  chex.assert_trees_all_close(guidance.cfgpp(eps, 0.4, null)(x, t, c),
                              guidance.classifier_free(eps, 0.4, null)(x, t, c), atol=1e-5)
  chex.assert_trees_all_close(guidance.apg(eps, VPSDE(), s, null, eta=1.0)(x, t, c), want, atol=1e-4)
  per_sample = guidance.compose(eps, c[:, None, :], jnp.full((b, 1), s), null)(x, t, c)
  chex.assert_trees_all_close(per_sample, want, atol=1e-5)
  with pytest.raises(ConfigError, match="compose"):
    guidance.compose(eps, c[:, None, :], jnp.ones((b, 2)), null)(x, t, c)


def test_condition_dropout_matches_label_dropout():
  key = jax.random.PRNGKey(7)
  y = jnp.arange(2000) % K
  dropped = losses.drop_labels(key, y, 0.3, K)
  c = jax.nn.one_hot(y, K + 1)
  null = jax.nn.one_hot(K, K + 1)
  dropped_c = losses.drop_labels(key, c, 0.3, null)
  np.testing.assert_array_equal(np.argmax(dropped_c, -1), dropped)   # the same samples dropped
  assert 0.25 < float(jnp.mean(dropped == K)) < 0.35


def test_conditions_draw_stays_in_class():
  table = np.arange(K * 3 * 2, dtype=np.float32).reshape(K, 3, 2)
  cond = conditioning.Conditions(table, np.zeros(2, np.float32))
  y = jnp.arange(600) % K
  got = np.asarray(cond.draw(jax.random.PRNGKey(8), y))
  rows = table.reshape(-1, 2)
  index = [int(np.flatnonzero((rows == g).all(-1))[0]) for g in got]
  np.testing.assert_array_equal(np.asarray(index) // 3, np.asarray(y))   # each from its class
  assert len(set(index)) == K * 3                                        # every caption used
  with pytest.raises(ValueError):
    conditioning.Conditions(table, np.zeros(3, np.float32))


def test_vector_loss_reaches_the_network():
  """The loss feeds condition vectors (and ∅ at p_uncond) to the network, never labels."""
  seen = []
  sde = VPSDE()
  table = np.random.default_rng(0).standard_normal((K, 2, 3)).astype(np.float32)
  null = np.full(3, 7.0, np.float32)

  def apply(variables, x, t, c, train=False, rngs=None):
    seen.append(c)
    return jnp.zeros_like(x)

  loss = losses.make_eps_loss(apply, sde, num_classes=K, p_uncond=0.5,
                              conditions=conditioning.Conditions(table, null))
  batch = {"image": jnp.zeros((64, 2)), "label": jnp.arange(64) % K}
  loss(None, batch, jax.random.PRNGKey(9))
  c = np.asarray(seen[0])
  assert c.shape == (64, 3)
  is_null = (c == null).all(-1)
  assert 0.3 < is_null.mean() < 0.7
  labels = np.arange(64) % K
  for i in np.flatnonzero(~is_null):
    assert any(np.allclose(c[i], row) for row in table[labels[i]])


def test_networks_check_the_condition():
  with pytest.raises(ConfigError, match="cond_dim"):
    models.UNet(num_classes=K, ch=8, ch_mult=(1,), groups=4, cond_dim=-1)
  vector = models.MLP(num_classes=K, hidden=8, depth=1, cond_dim=3)
  x, t = jnp.zeros((2, 2)), jnp.zeros(2)
  with pytest.raises(ConfigError, match=r"\(B, 3\)"):
    vector.init(jax.random.PRNGKey(0), x, t, jnp.zeros(2, jnp.int32))
  label = models.MLP(num_classes=K, hidden=8, depth=1)
  with pytest.raises(ConfigError, match="cond_dim"):
    label.init(jax.random.PRNGKey(0), x, t, jnp.zeros((2, 3)))


def test_captions_and_digits():
  cond = ml_collections.ConfigDict({"kind": "text", "names": ["zero", "one"], "numerals": ["0", "1"],
                                    "templates": ["a {name}", "digit {numeral}"],
                                    "held_out": ["number {name}"]})
  rows = conditioning.captions(cond, 2)
  assert rows == [("a zero", 0, "train"), ("a one", 1, "train"), ("digit 0", 0, "train"),
                  ("digit 1", 1, "train"), ("number zero", 0, "held_out"),
                  ("number one", 1, "held_out")]
  assert conditioning.digit_of("The Number ONE", cond) == 1
  assert conditioning.digit_of("someone", cond) is None          # whole words only
  assert conditioning.digit_of("a 0 or a one", cond) is None     # two classes: no single answer
  for field, value, needle in [("templates", ["a digit"], "must contain"),
                               ("templates", ["a {name} {label}"], "braces"),
                               ("held_out", ["a {name}"], "makes too"),
                               ("names", ["zero"], "2 classes")]:
    bad = ml_collections.ConfigDict(cond.to_dict())
    bad[field] = value
    with pytest.raises(ConfigError, match=needle):
      conditioning.captions(bad, 2)


# ------------------------------------------------------------------------- a text run, end to end

NAMES = ["zero", "one", "two", "three"]
DIM = 16


def text_config():
  from configs import toy2d
  c = toy2d.get_config()
  c.models = "score"
  c.train.update({"steps": 30, "batch_size": 64, "log_every": 10, "ckpt_every": 30})
  c.score.model.update({"hidden": 32, "depth": 2, "cond_dim": DIM})
  c.guide.model.update({"cond_dim": DIM})
  c.condition = ml_collections.ConfigDict({
      "kind": "text", "encoder_dir": "/nonexistent/encoder", "names": NAMES,
      "numerals": ["0", "1", "2", "3"], "templates": ["a {name}", "the digit {numeral}"],
      "held_out": ["number {name}"]})
  c.sample.update({"steps": 8, "num_per_class": 3})
  return c


def seed_encodings(workdir, config):
  """conditions.npz as train.py would write it, with random unit vectors for the encodings:
  the run then needs no encoder (and /nonexistent/encoder shows it is never opened)."""
  rows = conditioning.captions(config.condition, len(NAMES))
  rng = np.random.default_rng(0)
  vectors = rng.standard_normal((len(rows) + 1, DIM)).astype(np.float32)
  vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
  os.makedirs(workdir, exist_ok=True)
  conditioning.save(workdir, conditioning.Captions(
      np.asarray([r[0] for r in rows]), np.asarray([r[1] for r in rows], np.int32),
      np.asarray([r[2] for r in rows]), vectors[:-1], vectors[-1], "seeded by the test"))
  return vectors


@pytest.fixture(scope="module")
def text_workdir(tmp_path_factory):
  c = text_config()
  workdir = str(tmp_path_factory.mktemp("text") / "run")
  seed_encodings(workdir, c)
  report = train_job.train_and_evaluate(c, workdir, progress=False)
  assert report["score"]["steps"] == 30
  return workdir


def run_sample(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": conftest.xla_flags(1)}
  return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True,
                        text=True, env=env, timeout=180)


def test_text_run_samples_prompts(text_workdir, tmp_path):
  run = pipeline.load_run(text_workdir)
  assert run.cond_dim == DIM and run.null.shape == (DIM,)
  out = tmp_path / "s"
  res = run_sample(f"--workdir={text_workdir}", "--prompt=number two", "--prompt=a zero",
                   "--scale=1,3", "--num_per_class=3", f"--out={out}")
  assert res.returncode == 0, res.stderr[-3000:]
  with np.load(out / "samples.npz") as f:
    assert f["image"].shape == (2 * 2 * 3, 2)
    np.testing.assert_array_equal(f["prompt"], np.tile(np.repeat(["number two", "a zero"], 3), 2))
    np.testing.assert_array_equal(f["label"], np.tile(np.repeat([2, 0], 3), 2))
    image = f["image"]
  # The library gives the same samples: a prompt's cached encoding is what the network saw.
  req = sample_request.complete_request(sample_request.Request(
      guidance=("cfg",), scales={"cfg": [1.0, 3.0]}, num_per_class=3,
      prompts=["number two", "a zero"]), run)
  groups = sample_output.evaluate.draw(
      run, jax.random.PRNGKey(0), req.scales, [0, 1], 3,
      conditions=conditioning.embed_prompts(run.config, run.captions, req.prompts),
      sampler=req.sampler, steps=req.steps, spacing=req.spacing, **req.options)
  np.testing.assert_allclose(groups[0].images, image, rtol=1e-5, atol=1e-5)
  # A negative prompt in ∅'s place, and the default prompts: one held-out caption per class.
  res = run_sample(f"--workdir={text_workdir}", "--negative_prompt=a one", "--scale=2",
                   "--num_per_class=2", f"--out={tmp_path / 'n'}")
  assert res.returncode == 0, res.stderr[-3000:]
  with np.load(tmp_path / "n" / "samples.npz") as f:
    assert list(f["guidance"][::2]) == ["negative"] * 4
    assert list(f["prompt"][::2]) == [f"number {n}" for n in NAMES]


BAD_TEXT = [
    ("labels on a text run", ["--labels=1"], "--labels"),
    ("classifier on a text run", ["--guidance=classifier"], "class labels"),
    ("negative label on a text run", ["--guidance=negative", "--negative=1"], "--negative_prompt"),
    ("negative without prompt", ["--guidance=negative"], "--negative_prompt"),
    ("prompt twice", ["--prompt=a one", "--prompt=a one"], "twice"),
    ("prompt and labels", ["--prompt=a one", "--labels=1"], "--labels"),
    ("unknown prompt set", ["--prompt_set=test"], "--prompt_set"),
    ("unjudgeable prompt", ["--prompt=a one or a two", "--prompt=a zero", "--evaluate"], "names no class"),
    ("prompt needing the encoder", ["--prompt=a brand new caption"], "nonexistent"),
]


@pytest.mark.parametrize("case,args,needle", BAD_TEXT, ids=[c[0] for c in BAD_TEXT])
def test_bad_text_sample_input(case, args, needle, text_workdir, tmp_path):
  before, out = tree_hash(text_workdir), tmp_path / "out"
  message = sample_refusal([f"--workdir={text_workdir}", f"--out={out}", *args])
  assert needle in message, message
  assert tree_hash(text_workdir) == before and not out.exists()


def test_bad_text_sample_input_end_to_end(text_workdir, tmp_path):
  """The script itself on a prompt that needs the (absent) encoder: exit 2, one line, nothing written."""
  before, out = tree_hash(text_workdir), tmp_path / "out"
  res = run_sample(f"--workdir={text_workdir}", f"--out={out}", "--prompt=a brand new caption")
  assert_one_line_error(res, "nonexistent")
  assert tree_hash(text_workdir) == before and not out.exists()


def test_library_refusals(text_workdir):
  run = pipeline.load_run(text_workdir)
  with pytest.raises(ConfigError, match="no prompts"):
    conditioning.embed_prompts(run.config, run.captions, [])
  with pytest.raises(ConfigError, match="no prompts"):
    sample_request.complete_request(sample_request.Request(prompts=[]), run)
  with pytest.raises(ConfigError, match="prompt encodings"):
    pipeline.generate(run, jax.random.PRNGKey(0), np.zeros(2, np.int32), np.ones(2), kind="cfg",
                      steps=2)
