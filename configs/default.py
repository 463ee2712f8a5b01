"""Defaults shared by every preset. Any field can be overridden from the command line:

  python train.py --config configs/mnist.py:quick --workdir runs/mnist --config.train.steps=200

Per-model `train` blocks override `config.train`; their step counts are FieldReferences to
`train.steps`, so `--config.train.steps=N` rescales every model and
`--config.classifier.train.steps=M` sets one alone.
"""
import ml_collections
from ml_collections import config_dict


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.models = "score,classifier,evaluator"

  c.data = ml_collections.ConfigDict({"source": "mnist5k", "data_dir": ""})
  # What the score network is conditioned on: "label" (integer classes, ∅ = num_classes), or
  # "text" (caption encodings, ∅ = the encoding of ""; configs/mnist_text.py, jaxguide.conditioning).
  c.condition = ml_collections.ConfigDict({"kind": "label"})
  # The process (jaxguide.diffusion.sde): "vp", the VP-SDE with a linear β, or "flow", rectified
  # flow (its section is {"process": "flow", "T": 0.999}: configs/mnist.py:flow).
  c.sde = ml_collections.ConfigDict({"process": "vp", "beta_min": 0.01, "beta_max": 10.0})

  c.train = ml_collections.ConfigDict({
      "steps": 2000, "batch_size": 64, "lr": 2e-4, "warmup_steps": 100, "schedule": "constant",
      "grad_clip": 1.0, "weight_decay": 0.0, "ema_decay": 0.999, "log_every": 50,
      "ckpt_every": 500, "keep_ckpts": 3, "t_eps": 1e-3, "dtype": "float32", "num_devices": 0})
  steps = c.train.get_ref("steps")

  c.score = ml_collections.ConfigDict()
  c.score.model = ml_collections.ConfigDict({
      "arch": "unet", "ch": 32, "ch_mult": (1, 2, 2), "num_res_blocks": 1,
      "attn_resolutions": (), "dropout": 0.1, "groups": 8, "param": "eps"})
  # label dropout, one network learning ε(x,t,y) and ε(x,t,∅): docs/quality.md#label-dropout-scorep_uncond--01
  c.score.p_uncond = 0.1
  c.score.weighting = "eps"        # per-sample loss weight w(t): eps | v | min_snr | velocity (losses.py)
  c.score.min_snr_gamma = 5.0
  # uniform t, or logsnr_normal, λ(t) ~ N(logsnr_mean, logsnr_std²): docs/quality.md#uniform-t-scoret_sampling--uniform
  c.score.t_sampling = "uniform"
  c.score.logsnr_mean = 0.0
  c.score.logsnr_std = 3.0
  # or logit_normal, t = sigmoid(logit_mean + logit_std n) (SD3's, for flows: configs/mnist.py:flow)
  c.score.logit_mean = 0.0
  c.score.logit_std = 1.0
  c.score.train = ml_collections.ConfigDict({"steps": steps})

  # Autoguidance's weak guide (Karras et al. 2024): a score network of the same kind, smaller
  # and trained a quarter as long, with the score's loss settings. Not in the default `models`:
  # add it to a trained workdir with --config.models=guide (presets size it to their score net).
  c.guide = ml_collections.ConfigDict()
  c.guide.model = ml_collections.ConfigDict({
      "arch": "unet", "ch": 16, "ch_mult": (1, 2, 2), "num_res_blocks": 1,
      "attn_resolutions": (), "dropout": 0.1, "groups": 8, "param": "eps"})
  c.guide.train = ml_collections.ConfigDict({"steps": steps // 4})

  c.classifier = ml_collections.ConfigDict()
  c.classifier.model = ml_collections.ConfigDict({
      "arch": "classifier", "ch": 32, "ch_mult": (1, 2, 2), "num_res_blocks": 1,
      "dropout": 0.1, "groups": 8})
  c.classifier.train = ml_collections.ConfigDict({"steps": steps // 2, "lr": 1e-3})

  c.evaluator = ml_collections.ConfigDict()
  c.evaluator.model = ml_collections.ConfigDict({"arch": "lenet", "convs_per_stage": 1})
  c.evaluator.max_shift = 2         # random translations in pixels: augmentation for 4k images
  c.evaluator.train = ml_collections.ConfigDict({"steps": steps // 4, "lr": 1e-3, "ema_decay": 0.99})

  # The guided grids train.py draws at the end (and sample.py's defaults). spacing: the time grid,
  # linear | logsnr; clip_x0: clip x̂₀ to [-c, c] at every step (0 = off), on for [-1, 1] images;
  # guide_conditional: classifier guidance walks ε(x, t, y) (True) or ε(x, t, ∅) (False, the
  # reference tutorial's unconditional model); dtype: the networks' compute dtype when sampling,
  # float32 whatever train.dtype is (bfloat16 to choose mixed precision there too); interval:
  # (lo, hi) to guide only for t in [lo, hi] (Kynkäänniemi et al. 2024; every kind that takes
  # an interval, CFG++ does not), None to guide at every t; sample.py's --interval overrides it.
  c.sample = ml_collections.ConfigDict({
      "sampler": "ddim", "steps": 100, "spacing": "linear", "clip_x0": 1.0, "cfg_scale": 3.0,
      "clf_scale": 8.0, "cfgpp_scale": 0.6, "num_per_class": 8, "guide_conditional": False,
      "interval": config_dict.placeholder(tuple), "dtype": "float32"})
  return c
