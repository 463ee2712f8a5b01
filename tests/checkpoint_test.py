"""Orbax checkpoints: save -> restore gives equal trees; retention; config JSON beside them."""
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxguide.training import checkpoint
from jaxguide.training import workdir as wd


class CheckpointTest(chex.TestCase):

  def _tree(self, seed):
    k = jax.random.PRNGKey(seed)
    params = {"dense": {"kernel": jax.random.normal(k, (3, 4)), "bias": jnp.zeros((4,))}}
    return {"step": jnp.asarray(seed, jnp.int32), "params": params,
            "opt_state": optax.adam(1e-3).init(params), "rng": jax.random.PRNGKey(seed + 1)}

  def test_save_restore_equal_trees(self):
    ckpt = checkpoint.Checkpointer(self.create_tempdir().full_path, save_every=1, keep=2)
    tree = self._tree(7)
    self.assertTrue(ckpt.save(7, tree))
    restored = ckpt.restore(jax.tree.map(jnp.zeros_like, tree))
    chex.assert_trees_all_equal(restored, tree)
    chex.assert_trees_all_equal_dtypes(restored, tree)
    raw = ckpt.restore()
    np.testing.assert_array_equal(raw["params"]["dense"]["kernel"], tree["params"]["dense"]["kernel"])
    ckpt.close()

  def test_one_part_restored_to_host_or_onto_a_mesh(self):
    """`part` reads one top-level entry: as host arrays, or straight onto a sharding (each device
    its copy); a missing entry is a one-line CheckpointError."""
    ckpt = checkpoint.Checkpointer(self.create_tempdir().full_path, save_every=1)
    tree = self._tree(3)
    ckpt.save(3, tree)
    host = ckpt.restore(part="params")
    self.assertIsInstance(host["dense"]["kernel"], np.ndarray)
    chex.assert_trees_all_equal(host, jax.device_get(tree["params"]))
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                          tree["params"])
    placed = ckpt.restore(target, part="params")
    for leaf in jax.tree.leaves(placed):
      self.assertEqual(leaf.sharding, replicated)
    chex.assert_trees_all_equal(placed, tree["params"])
    with self.assertRaisesRegex(checkpoint.CheckpointError, "holds no ema_params"):
      ckpt.restore(part="ema_params")
    with self.assertRaisesRegex(checkpoint.CheckpointError, "another config or image shape"):
      ckpt.restore({"dense": {"kernel": np.zeros((3, 5), np.float32),
                              "bias": np.zeros(4, np.float32)}}, part="params")
    ckpt.close()

  def test_interval_and_retention(self):
    directory = self.create_tempdir().full_path
    ckpt = checkpoint.Checkpointer(directory, save_every=10, keep=2)
    saved = [s for s in range(1, 41) if ckpt.save(s, self._tree(s))]
    self.assertEqual(saved, [10, 20, 30, 40])
    self.assertEqual(ckpt.all_steps(), [30, 40])       # only the last `keep`
    self.assertTrue(ckpt.save(41, self._tree(41), force=True))
    self.assertEqual(ckpt.latest_step(), 41)
    ckpt.close()
    # A new manager on the same folder sees what is on disk.
    again = checkpoint.Checkpointer(directory, save_every=10, keep=2)
    self.assertEqual(again.latest_step(), 41)
    chex.assert_trees_all_equal(again.restore(self._tree(0)), self._tree(41))

  def test_unfinished_save_is_ignored(self):
    directory = self.create_tempdir().full_path
    ckpt = checkpoint.Checkpointer(directory, save_every=1, keep=3)
    ckpt.save(5, self._tree(5))
    ckpt.close()
    # What a save killed before orbax's rename leaves behind: a temporary folder.
    os.makedirs(os.path.join(directory, "9.orbax-checkpoint-tmp-123"))
    again = checkpoint.Checkpointer(directory, save_every=1, keep=3)
    self.assertEqual(again.latest_step(), 5)

  def test_config_json_roundtrip(self):
    from configs import mnist
    cfg = mnist.get_config("quick")
    workdir = self.create_tempdir().full_path
    self.assertIsNone(wd.load_config(workdir))
    wd.save_config(workdir, cfg)
    loaded = wd.load_config(workdir)
    self.assertEqual(loaded.score.model.ch, cfg.score.model.ch)
    self.assertEqual(list(loaded.score.model.ch_mult), list(cfg.score.model.ch_mult))
    self.assertEqual(loaded.classifier.train.steps, cfg.classifier.train.steps)   # references resolved
    self.assertEqual(sorted(os.listdir(workdir)), ["config.json"])    # no temporary file left

  def test_atomic_files_get_the_umask_mode(self):
    path = os.path.join(self.create_tempdir().full_path, "report.json")
    umask = os.umask(0o022)
    try:
      checkpoint.atomic_write_text(path, "{}")
    finally:
      os.umask(umask)
    self.assertEqual(os.stat(path).st_mode & 0o777, 0o644)

  def test_sibling_read_failures_are_dropped_only_after_a_failed_read(self):
    """asyncio's "Task exception was never retrieved" from a failed read's siblings is dropped;
    the same report around a read that succeeds, and any other asyncio report, still reach the
    handlers."""
    import logging
    logger = logging.getLogger("jaxguide_test_asyncio")
    logger.propagate = False
    seen = []

    class Keep(logging.Handler):
      def emit(self, record):
        seen.append(record.getMessage())
    logger.addHandler(Keep())
    siblings = checkpoint._SiblingReadFailures()
    logger.addFilter(siblings)
    drop = "Task exception was never retrieved\nfuture: <Task finished>"
    with siblings.reading():
      logger.error(drop)
      self.assertEqual(seen, [])          # held while the read is in flight
    self.assertEqual(seen, [drop])        # the read succeeded: logged as usual
    with self.assertRaises(ValueError):
      with siblings.reading():
        logger.error(drop)
        raise ValueError("DATA_LOSS")
    logger.error(drop)                    # a sibling collected later, e.g. at exit
    logger.error("some other asyncio report")
    self.assertEqual(seen, [drop, "some other asyncio report"])
