"""Fashion-MNIST from an MNIST-format folder (Debian: apt-get install dataset-fashion-mnist)."""
import ml_collections

from configs import mnist


def get_config(arg: str = "quick") -> ml_collections.ConfigDict:
  c = mnist.get_config(arg or "quick")
  c.data.source = "idx:/usr/share/datasets/fashion-mnist"
  return c
