"""sample.py and the pipeline on a tiny trained toy workdir: outputs, reports, one compile per
guidance kind, sweeps equal to separate runs, bad input."""
import dataclasses
import json
import os
import subprocess
import sys
import types

import jax
import ml_collections
import numpy as np
import pytest

from cli_test import assert_one_line_error, copy_without, sample_refusal, tree_hash
from diagnose_test import _untrained_workdir
import conftest
from jaxguide import pipeline
from jaxguide import samplers
from jaxguide import evaluation
from jaxguide.cli import sample_output
from jaxguide.cli import sample_request
from jaxguide.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def toy_workdir(toy_run):
  return toy_run   # conftest's session workdir: score, classifier and guide


def run_sample(*args, timeout=180):
  # Two devices while the workdir was trained on one: checkpoints must not pin their devices.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": conftest.xla_flags(2)}
  return subprocess.run([sys.executable, "sample.py", *args], cwd=ROOT, capture_output=True,
                        text=True, env=env, timeout=timeout)


def test_sample_writes_outputs(toy_workdir, tmp_path):
  # Two kinds in one command: cfg takes the LIST without a kind, classifier its own.
  out = tmp_path / "s"
  res = run_sample(f"--workdir={toy_workdir}", "--guidance=cfg,classifier", "--scale=0,1,3",
                   "--scale=classifier=0,4", "--steps=10", "--num_per_class=5", f"--out={out}",
                   "--evaluate")
  assert res.returncode == 0, res.stderr[-3000:]
  with np.load(out / "samples.npz") as f:
    assert f["image"].shape == (5 * 4 * 5, 2) and f["image"].dtype == np.float32
    np.testing.assert_array_equal(f["scale"], np.repeat([0, 1, 3, 0, 4], 20).astype(np.float32))
    np.testing.assert_array_equal(f["label"], np.tile(np.repeat(np.arange(4), 5), 5))
    np.testing.assert_array_equal(f["guidance"], ["cfg"] * 60 + ["classifier"] * 40)
    image = f["image"]
  names = sorted(os.listdir(out))
  assert names == ["points_cfg_s0.png", "points_cfg_s1.png", "points_cfg_s3.png",
                   "points_classifier_s0.png", "points_classifier_s4.png", "report.json",
                   "report.md", "samples.npz", "sweep.png"], names
  with open(out / "report.json") as f:
    report = json.load(f)
  rows = report["report"]
  assert [(r["guidance"], r["scale"]) for r in rows] == [
      ("cfg", 0), ("cfg", 1), ("cfg", 3), ("classifier", 0), ("classifier", 4)]
  assert report["reference"]["floor"] < report["reference"]["ceiling"]
  for r in rows:
    assert 0 <= r["worst_class_accuracy"] <= r["accuracy"] <= 1 and r["frechet_distance"] >= 0
  # cfg s=0 and classifier w=0 both walk ε(x, t, ∅) from the same key: the same samples and figures.
  np.testing.assert_allclose(image[:20], image[60:80], rtol=1e-5, atol=1e-6)
  assert rows[0]["accuracy"] == rows[3]["accuracy"]
  md = (out / "report.md").read_text()
  assert "floor" in md.split("| guidance |")[0] and "ceiling" in md.split("| guidance |")[0]
  table = [l for l in md.splitlines() if l.startswith("|")]
  assert len(table) == 2 + len(rows), md


def test_scale_list_compiles_once(toy_workdir):
  run = pipeline.load_run(toy_workdir)
  labels = np.arange(8) % 4
  first, second = {}, {}
  a = pipeline.generate(run, jax.random.PRNGKey(0), labels, np.full(8, 2.0), kind="cfg", steps=5,
                        sampler="ddim", timings=first)
  b = pipeline.generate(run, jax.random.PRNGKey(0), labels, np.linspace(0, 5, 8), kind="cfg", steps=5,
                        sampler="ddim", timings=second)
  assert first["compile_s"] > 0 and second["compile_s"] == 0.0
  assert a.shape == b.shape == (8, 2) and not np.allclose(a, b)


def test_sweep_equals_separate_runs(toy_workdir):
  """Each block of a per-sample-scale sweep is what a run at that scale alone (same key, same
  batch layout) draws; each kind compiles once, and the separate runs reuse its executable."""
  run = pipeline.load_run(toy_workdir)
  key, kw = jax.random.PRNGKey(3), {"sampler": "ddim", "steps": 4}
  groups = evaluation.draw(run, key, {"cfg": [0.0, 2.0, 5.0], "classifier": [1.0, 6.0]},
                         [0, 1, 2, 3], 3, **kw)
  assert [g.kind for g in groups] == ["cfg", "classifier"]
  assert all(g.compile_s > 0 for g in groups)
  for g in groups:
    blocks = g.blocks()
    for scale, block in blocks:
      timings = {}
      alone = pipeline.generate(run, key, g.labels, np.full(len(g.labels), scale), kind=g.kind,
                                timings=timings, **kw)
      assert timings["compile_s"] == 0.0
      np.testing.assert_allclose(g.images[block], alone[block], rtol=1e-5, atol=1e-6)
    assert not np.allclose(g.images[blocks[0][1]], g.images[blocks[-1][1]])   # scales matter


def test_sweep_report_rows(toy_workdir):
  run = pipeline.load_run(toy_workdir)
  judge = evaluation.run_judge(run)
  groups, rows, reference = evaluation.sweep(run, jax.random.PRNGKey(0), {"cfg": [1.0, 3.0]}, [1, 2], 4,
                                           judge=judge, sampler="ddim", steps=4)
  assert [(r["guidance"], r["scale"], sorted(r["per_class"])) for r in rows] == [
      ("cfg", 1.0, [1, 2]), ("cfg", 3.0, [1, 2])]
  assert reference["n_samples"] == 8 and reference["n_test"] == int(np.isin(judge.test.label, [1, 2]).sum())
  block = groups[0].blocks()[1][1]
  direct = evaluation.sample_metrics(judge, groups[0].images[block], groups[0].labels[block])
  assert rows[1] == {"guidance": "cfg", "scale": 3.0, **direct}


def flags_ns(**kw):
  base = {"guidance": None, "scale": None, "clf_scale": None, "sampler": None, "steps": None,
          "spacing": None, "num_per_class": None, "labels": None, "seed": 0, "batch_size": 1000,
          "gif": False, "evaluate": False, "raw": False, "eta": None, "snr": None, "clip_x0": None,
          "guide_conditional": None, "rescale": 0.0, "interval": None}
  return types.SimpleNamespace(**{**base, **kw})


SWEEP_FORMS = [
    (None, None, ("cfg",), {}),
    ("cfg", ["1,3,5"], ("cfg",), {"cfg": [1, 3, 5]}),
    ("classifier", None, ("classifier",), {}),
    (None, ["2.5"], ("cfg",), {"cfg": [2.5]}),
    ("cfg,classifier", ["cfg=0,1,3", "classifier=0,4,8"], ("cfg", "classifier"),
     {"cfg": [0, 1, 3], "classifier": [0, 4, 8]}),
    (None, ["classifier=4,8", "cfg=1"], ("classifier", "cfg"), {"classifier": [4, 8], "cfg": [1]}),
    ("cfg,none,classifier", ["1,3", "classifier=8"], ("cfg", "none", "classifier"),
     {"cfg": [1, 3], "none": [1, 3], "classifier": [8]}),
    ("cfg,classifier", ["classifier=8"], ("cfg", "classifier"), {"classifier": [8]}),
]


@pytest.mark.parametrize("guidance,scale,kinds,scales", SWEEP_FORMS)
def test_sweep_flag_forms(guidance, scale, kinds, scales):
  req = sample_request.request_from_flags(flags_ns(guidance=guidance, scale=scale))
  assert (req.guidance, req.scales) == (kinds, scales)


def test_unlisted_kinds_take_config_scales(toy_workdir):
  run = pipeline.load_run(toy_workdir)
  req = sample_request.request_from_flags(flags_ns(guidance="cfg,classifier,none", scale=["classifier=5"]))
  req = sample_request.complete_request(req, run)
  assert req.scales == {"cfg": [run.config.sample.cfg_scale], "classifier": [5.0],
                        "none": [run.config.sample.cfg_scale]}


BAD_SWEEP = [
    ("cfg,magic", None, "'magic' is not known"),
    ("cfg,cfg", None, "twice"),
    (None, ["1", "3"], "twice without a kind"),
    (None, ["magic=1"], "not a guidance kind"),
    (None, ["cfg=1", "cfg=3"], "names cfg twice"),
    ("cfg", ["classifier=4"], "--guidance=cfg,classifier"),
    (None, ["1,3", "classifier=4"], "needs --guidance"),
    ("cfg", ["1", "cfg=3"], "serves no kind"),
    (None, ["cfg=1,1"], "lists 1 twice"),
    (None, ["cfg="], "is empty"),
    (None, ["cfg=1,x"], "comma list of numbers"),
    (None, ["cfg=1,inf"], "finite"),
]


@pytest.mark.parametrize("guidance,scale,needle", BAD_SWEEP)
def test_bad_sweep_forms(guidance, scale, needle):
  with pytest.raises(ConfigError) as e:
    sample_request.request_from_flags(flags_ns(guidance=guidance, scale=scale))
  assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


BAD_SAMPLE = [
    ("no workdir", lambda w, t: str(t / "nothing"), [], "no trained run"),
    ("no classifier", lambda w, t: copy_without(w, t, "classifier"), ["--guidance=classifier"], "classifier"),
    ("label out of range", None, ["--labels=0,7"], "--labels"),
    ("prompt on a label run", None, ["--prompt=a handwritten seven"], "trained on class labels"),
    ("negative prompt on a label run", None, ["--negative_prompt=a one"], "trained on class labels"),
    ("unknown sampler", None, ["--sampler=heun3"], "sampler"),
    ("unknown guidance", None, ["--guidance=magic"], "guidance"),
    ("zero steps", None, ["--steps=0"], "steps"),
    ("bad scale", None, ["--scale=1,x"], "--scale"),
    ("missing score checkpoint", lambda w, t: copy_without(w, t, "score"), [], "score"),
    ("eta without ddim", None, ["--sampler=pc", "--eta=0.5"], "eta"),
    ("bad interval", None, ["--interval=0.9,0.1"], "interval"),
    ("scale of an unknown kind", None, ["--scale=magic=1,2"], "--scale"),
    ("scale of an unguided kind", None, ["--guidance=cfg", "--scale=classifier=4"], "--guidance"),
    ("scale listed twice", None, ["--scale=cfg=1,1"], "--scale"),
    ("two lists without a kind", None, ["--scale=1", "--scale=3"], "--scale"),
    ("unknown spacing", None, ["--spacing=cosine"], "--spacing"),
    ("negative clip_x0", None, ["--clip_x0=-1"], "--clip_x0"),
    ("negative eta", None, ["--sampler=ddim", "--eta=-0.5"], "--eta"),
    ("zero snr", None, ["--sampler=pc", "--snr=0"], "--snr"),
    ("infinite clf_scale", None, ["--guidance=both", "--clf_scale=inf"], "--clf_scale"),
    ("unknown schedule", None, ["--schedule=square"], "--schedule"),
    ("negative label out of range", None, ["--guidance=negative", "--negative=9"], "--negative"),
    ("negative without its kind", None, ["--negative=1"], "--negative"),
    ("compose malformed", None, ["--guidance=compose", "--compose=1-2"], "--compose"),
    ("compose label out of range", None, ["--guidance=compose", "--compose=1:1,7:2"], "--compose"),
    ("compose without pairs", None, ["--guidance=compose"], "--compose"),
    ("cfgpp lambda above one", None, ["--scale=cfgpp=0.5,1.5"], "[0, 1]"),
    ("cfgpp with an sde sampler", None, ["--scale=cfgpp=0.5", "--sampler=pc"], "cfgpp"),
    ("zero norm_threshold", None, ["--guidance=apg", "--norm_threshold=0"], "--norm_threshold"),
    ("negative recurrence", None, ["--guidance=cfg", "--recurrence=-1"], "--recurrence"),
    ("fdg on points", None, ["--guidance=fdg"], "needs image data"),
    ("churn off edm", None, ["--sampler=ddim", "--churn=40"], "--churn is an option of --sampler edm"),
    ("negative churn", None, ["--sampler=edm", "--churn=-1"], "--churn=-1"),
    ("s_tmin above s_tmax", None, ["--sampler=edm", "--s_tmin=2", "--s_tmax=1"], "--s_tmin=2 > --s_tmax=1"),
    ("rho off karras", None, ["--spacing=linear", "--rho=7"], "--rho is an option of --spacing karras"),
    ("rho zero", None, ["--spacing=karras", "--rho=0"], "--rho=0"),
    ("fdg one level", None, ["--guidance=fdg", "--fdg_levels=1"], "--fdg_levels"),
    ("momentum of one", None, ["--guidance=apg", "--apg_momentum=1"], "(-1, 1)"),
    ("momentum without apg", None, ["--guidance=cfg", "--apg_momentum=-0.5"], "--guidance apg"),
    ("autoguidance without a guide", lambda w, t: copy_without(w, t, "guide"),
     ["--guidance=autoguidance"], "guide"),
    ("x0_classifier without an evaluator", None, ["--guidance=x0_classifier"], "evaluator"),
    ("unknown dtype", None, ["--dtype=float16"], "--dtype"),
    ("no workdir flag", lambda w, t: "", [], "--workdir is required"),
    ("stray argument", None, ["extra"], "unexpected arguments"),
]


@pytest.mark.parametrize("case,make,args,needle", BAD_SAMPLE, ids=[c[0] for c in BAD_SAMPLE])
def test_bad_sample_input(case, make, args, needle, toy_workdir, tmp_path):
  workdir = make(toy_workdir, tmp_path) if make else toy_workdir
  before, out = tree_hash(workdir), tmp_path / "out"
  message = sample_refusal([f"--workdir={workdir}", f"--out={out}", *args])
  assert needle in message, message
  assert tree_hash(workdir) == before and not out.exists()


def test_bad_sample_input_end_to_end(toy_workdir, tmp_path):
  """The script itself: exit 2, one line on stderr, nothing written."""
  before, out = tree_hash(toy_workdir), tmp_path / "out"
  res = run_sample(f"--workdir={toy_workdir}", f"--out={out}", "--sampler=pc", "--eta=0.5")
  assert_one_line_error(res, "eta")
  assert tree_hash(toy_workdir) == before and not out.exists()


@pytest.fixture(scope="module")
def image_workdir(tmp_path_factory):
  """An untrained 8×8 image workdir (random weights: its samples leave [−1, 1] when unclipped)
  whose score network trained with its own t_eps, 0.02 (config.train.t_eps stays 1e-3)."""
  from configs import mnist
  c = mnist.get_config("quick")
  c.models = "score"
  c.score.model.update({"ch": 4, "ch_mult": (1,), "groups": 2})
  c.score.train.t_eps = 0.02
  c.sample.update({"steps": 3, "num_per_class": 1})
  return _untrained_workdir(tmp_path_factory.mktemp("img") / "run", c, (8, 8, 1), 10)


def test_config_sampling_defaults(toy_workdir, image_workdir):
  """spacing and clip_x0 come from config.sample unless the flags set them; t_eps from the score
  network's training config."""
  image, toy = pipeline.load_run(image_workdir), pipeline.load_run(toy_workdir)
  assert image.t_eps == 0.02 and toy.t_eps == toy.config.train.t_eps == 1e-3
  def complete(run, **flags):
    return sample_request.complete_request(sample_request.request_from_flags(flags_ns(**flags)), run)
  req = complete(image)   # the quick preset clips x̂₀ and guides ε(x, t, y) with the classifier
  assert (req.spacing, req.options) == ("linear", {"clip_x0": 1.0, "guide_conditional": True})
  req = complete(image, clip_x0=0.0, spacing="logsnr", guide_conditional=False)
  assert (req.spacing, req.options) == ("logsnr", {})
  assert complete(image, clip_x0=2.0).options == {"clip_x0": 2.0, "guide_conditional": True}
  assert complete(toy).options == {}                                   # toy2d does not
  assert complete(toy, clip_x0=1.0).options == {"clip_x0": 1.0}
  # classifier guidance's base: the config's sample.guide_conditional, a flag overrides either way
  assert complete(toy, guide_conditional=True).options == {"guide_conditional": True}
  def with_sample(run, **fields):   # a new value of any type, as a hand-edited config.json
    d = run.config.to_dict()
    d["sample"].update(fields)
    return dataclasses.replace(run, config=ml_collections.ConfigDict(d))
  conditional = with_sample(toy, guide_conditional=True)
  assert complete(conditional).options == {"guide_conditional": True}
  assert complete(conditional, guide_conditional=False).options == {}
  with pytest.raises(ConfigError, match="sample.guide_conditional"):
    complete(with_sample(toy, guide_conditional=1))
  # the guidance interval: the config's sample.interval (a JSON list) unless --interval says
  # otherwise; 0,1 is every t, the same as none, and is dropped
  assert "interval" not in complete(image).options
  banded = with_sample(image, interval=[0.2, 0.7])
  assert complete(banded).options["interval"] == (0.2, 0.7)
  assert complete(banded, interval="0.1,0.9").options["interval"] == (0.1, 0.9)
  assert "interval" not in complete(banded, interval="0,1").options
  assert "interval" not in complete(image, interval="0,1").options
  for bad in ([0.7, 0.2], [0.2], "0.2,0.7", [0.0, 1.5], [float("nan"), 0.5]):
    with pytest.raises(ConfigError, match=r"sample.interval=.*0 <= lo < hi <= 1"):
      complete(with_sample(image, interval=bad))


def test_generate_stops_at_the_score_t_eps(image_workdir):
  run = pipeline.load_run(image_workdir)
  y, key = np.arange(2, dtype=np.int32), jax.random.PRNGKey(0)
  x = pipeline.generate(run, key, y, np.full(2, 3.0, np.float32), kind="cfg", sampler="ddim",
                        steps=3)
  g = pipeline.guided_eps_fn(run, run.params, "cfg", 3.0)
  direct = lambda t_eps: samplers.sample(jax.random.fold_in(key, 0), g, run.sde, (2, 8, 8, 1), y,
                                         "ddim", 3, t_eps=t_eps)
  np.testing.assert_allclose(x, direct(0.02), rtol=1e-4, atol=1e-4)
  assert not np.allclose(x, direct(1e-3), rtol=1e-4, atol=1e-4)


def test_edm_with_churn_on_the_karras_grid_from_the_command_line(toy_workdir, tmp_path):
  out = tmp_path / "out"
  res = run_sample(f"--workdir={toy_workdir}", f"--out={out}", "--sampler=edm", "--churn=40",
                   "--spacing=karras", "--steps=4", "--num_per_class=2", "--guidance=cfg")
  assert res.returncode == 0, res.stderr[-3000:]
  request = json.loads(res.stdout)["request"]
  assert request["sampler"] == "edm" and request["spacing"] == "karras"
  with np.load(out / "samples.npz") as f:
    assert np.all(np.isfinite(f["image"]))


def test_fdg_momentum_and_recurrence_through_the_pipeline(image_workdir):
  """FDG with equal band scales samples what CFG samples; APG's momentum and self-recurrence (a
  sampler option, not a guidance one) change the draw; all from `pipeline.generate`."""
  run = pipeline.load_run(image_workdir)
  y, key, s = np.arange(2, dtype=np.int32), jax.random.PRNGKey(0), np.full(2, 2.0, np.float32)
  draw = lambda kind, **o: pipeline.generate(run, key, y, s, kind=kind, sampler="ddim", steps=3, **o)
  np.testing.assert_allclose(draw("fdg", fdg_low=2.0), draw("cfg"), atol=1e-4)
  assert not np.allclose(draw("fdg", fdg_low=0.5), draw("cfg"), atol=1e-3)
  plain = draw("apg")
  assert not np.allclose(draw("apg", apg_momentum=-0.5), plain, atol=1e-4)
  assert not np.allclose(draw("apg", recurrence=1), plain, atol=1e-4)


def test_images_written_in_range_unless_raw(image_workdir, tmp_path):
  # x̂₀ clipping off, so only the final clip keeps the written images in [−1, 1].
  common = [f"--workdir={image_workdir}", "--guidance=cfg", "--labels=0,1", "--clip_x0=0"]
  run = pipeline.load_run(image_workdir)
  req = sample_request.complete_request(sample_request.request_from_flags(flags_ns(
      guidance="cfg", labels="0,1", clip_x0=0.0)), run)
  sample_output.sample_and_write(run, req, sample_output.prepare_out(str(tmp_path / "clipped")))
  res = run_sample(*common, "--raw", "--spacing=logsnr", f"--out={tmp_path / 'raw'}")
  assert res.returncode == 0, res.stderr[-3000:]
  assert json.loads(res.stdout)["request"]["spacing"] == "logsnr"
  res = run_sample(*common, f"--out={tmp_path / 'raw_linear'}", "--raw")
  assert res.returncode == 0, res.stderr[-3000:]
  with np.load(tmp_path / "clipped" / "samples.npz") as f, \
       np.load(tmp_path / "raw_linear" / "samples.npz") as g:
    clipped, raw = f["image"], g["image"]
  assert clipped.shape == raw.shape == (2, 8, 8, 1)
  assert np.abs(raw).max() > 1.0 and np.abs(clipped).max() <= 1.0
  np.testing.assert_allclose(clipped, np.clip(raw, -1.0, 1.0), rtol=1e-5, atol=1e-5)
  assert os.path.exists(tmp_path / "clipped" / f"grid_cfg_s{run.config.sample.cfg_scale:g}.png")


def test_every_new_kind_from_the_command_line(toy_workdir, tmp_path):
  """The newer kinds sweep from sample.py in one call; samples.npz holds every kind × scale."""
  out = tmp_path / "out"
  res = run_sample(f"--workdir={toy_workdir}", f"--out={out}", "--steps=3", "--num_per_class=2",
                   "--guidance=negative,compose,autoguidance,apg,cfgpp", "--scale=1,2",
                   "--scale=cfgpp=0,0.5", "--negative=0", "--compose=1:1,2:-0.5",
                   "--norm_threshold=2", "--schedule=linear", "--sampler=ddim")
  assert res.returncode == 0, res.stderr[-3000:]
  with np.load(out / "samples.npz") as z:
    kinds = sorted(set(z["guidance"].tolist()))
    assert kinds == ["apg", "autoguidance", "cfgpp", "compose", "negative"]
    assert len(z["image"]) == 5 * 2 * 4 * 2 and np.isfinite(z["image"]).all()


def test_autoguidance_at_one_is_the_score_network(toy_workdir):
  run = pipeline.load_run(toy_workdir)
  y, key = np.arange(4, dtype=np.int32), jax.random.PRNGKey(0)
  plain = pipeline.generate(run, key, y, np.ones(4, np.float32), kind="none", sampler="ddim", steps=4)
  auto = pipeline.generate(run, key, y, np.ones(4, np.float32), kind="autoguidance", sampler="ddim",
                           steps=4)
  np.testing.assert_allclose(auto, plain, atol=1e-5)
  away = pipeline.generate(run, key, y, np.full(4, 3.0, np.float32), kind="autoguidance",
                           sampler="ddim", steps=4)
  assert not np.allclose(away, plain, atol=1e-3)
