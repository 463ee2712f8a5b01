"""Data: sources → host datasets (`sources`, `tfds`, `dataset`) → batches that are a pure
function of (seed, step) (`batches`); `prepare` writes the offline copies once."""
from jaxguide.data.batches import Batches, batch_at, batch_indices, host_batch_at, process_rows
from jaxguide.data.dataset import SPLITS, Dataset, model_batch, to_unit_range
from jaxguide.data.sources import info, load, mnist_dir, num_classes, open_split, toy_mixture
from jaxguide.data.tfds import Records, read_all
