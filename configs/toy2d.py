"""2-D labelled Gaussian mixture (`toy:gmm`): exact scores are known; trains in seconds on a CPU
(docs/quality.md#toy2d-configstoy2dpy).

  configs/toy2d.py        the VP-SDE
  configs/toy2d.py:flow   the same task as a rectified flow: velocity MLP, flow-matching loss,
                          logit-normal times
"""
import ml_collections

from configs import default


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in ("", "flow"):
    raise ValueError(f"configs/toy2d.py:{arg}: unknown preset: use configs/toy2d.py or :flow")
  c = default.get_config()
  c.models = "score,classifier"
  c.data.source = "toy:gmm"
  c.train.update({"steps": 3000, "batch_size": 256, "lr": 1e-3, "warmup_steps": 100,
                  "log_every": 100, "ckpt_every": 1000, "ema_decay": 0.995})
  c.score.model = ml_collections.ConfigDict({"arch": "mlp", "hidden": 128, "depth": 3})
  c.guide.model = ml_collections.ConfigDict({"arch": "mlp", "hidden": 32, "depth": 2})
  c.classifier.model = ml_collections.ConfigDict({"arch": "mlp_classifier", "hidden": 128, "depth": 3})
  c.classifier.train.lr = 1e-3
  c.sample.update({"sampler": "ddim", "steps": 100, "num_per_class": 256, "clip_x0": 0.0})
  if arg == "flow":
    c.sde = ml_collections.ConfigDict({"process": "flow", "T": 0.999})
    for role in ("score", "guide"):
      c[role].model.param = "velocity"
    c.score.weighting = "velocity"
    c.score.t_sampling = "logit_normal"
  return c
