"""CIFAR-10 (32x32x3) through TensorFlow Datasets; sized for one GPU, needs the dataset prepared."""
import ml_collections

from configs import default


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  del arg
  c = default.get_config()
  c.data.source = "tfds:cifar10"
  c.train.update({"steps": 100000, "batch_size": 128, "lr": 2e-4, "warmup_steps": 1000,
                  "log_every": 500, "ckpt_every": 5000, "ema_decay": 0.9999, "dtype": "bfloat16"})
  c.score.model.update({"ch": 128, "ch_mult": (1, 2, 2, 2), "num_res_blocks": 2,
                        "attn_resolutions": (16,), "dropout": 0.1})
  c.guide.model.update({"ch": 64, "ch_mult": (1, 2, 2, 2), "num_res_blocks": 2,
                        "attn_resolutions": (16,), "dropout": 0.1})   # half the score's width
  c.classifier.model.update({"ch": 64, "ch_mult": (1, 2, 2, 2), "num_res_blocks": 2, "dropout": 0.1})
  c.classifier.train.update({"steps": 50000, "lr": 3e-4})
  c.evaluator.model = ml_collections.ConfigDict({"arch": "lenet"})
  c.evaluator.train.update({"steps": 20000})
  c.sample.update({"steps": 250, "cfg_scale": 2.0, "clf_scale": 2.0})
  return c
