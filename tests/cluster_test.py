"""jaxguide.cluster: launches refused before jax starts, and the agreements between processes,
with a stand-in for the all-gather (the real one runs in tests/multiprocess_test.py)."""
import json
import os
import socket
import time

import numpy as np
import pytest
from absl import flags

from jaxguide import cli, cluster
from jaxguide.errors import ConfigError
from jaxguide.training import checkpoint
from jaxguide.training import run as train_run
from jaxguide.training import workdir as wd


@pytest.mark.parametrize("environ, world", [
    ({}, None),
    ({"SLURM_NTASKS": "1"}, None),
    ({"SLURM_NTASKS": "4"}, ("SLURM_NTASKS", 4)),
    ({"SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "4"}, None),   # one task of a 4-task allocation
    ({"OMPI_COMM_WORLD_SIZE": "8"}, ("OMPI_COMM_WORLD_SIZE", 8)),
    ({"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}, ("TPU_WORKER_HOSTNAMES", 4)),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
])
def test_world_size_from_env(environ, world):
  assert cluster.world_size_from_env(environ) == world


def launch(environ, distributed=False, explicit=False, single=False, ids=None):
  cluster.check_launch(distributed=distributed, explicit=explicit, single_process=single,
                       local_device_ids=ids, environ=environ)


def test_a_task_of_several_without_distributed_is_refused():
  with pytest.raises(ConfigError, match=r"SLURM_NTASKS=2: .* add --distributed, or --single_process"):
    launch({"SLURM_NTASKS": "2"})
  launch({"SLURM_NTASKS": "2"}, single=True)
  launch({"SLURM_NTASKS": "2", "SLURM_JOB_ID": "7"}, distributed=True)
  launch({"SLURM_NTASKS": "2"}, explicit=True)


SLURM_NODE = {"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_GPUS_ON_NODE": "8"}


def test_idle_gpus_under_slurm_are_refused():
  with pytest.raises(ConfigError, match=r"SLURM_GPUS_ON_NODE=8 with 1 task.*leaving 7 idle.*"
                                        r"--ntasks-per-node=8.*--local_device_ids=0,...,7"):
    launch({**SLURM_NODE, "SLURM_TASKS_PER_NODE": "1(x4)"}, distributed=True)
  launch({**SLURM_NODE, "SLURM_TASKS_PER_NODE": "1(x4)"}, distributed=True, ids=list(range(8)))
  launch({**SLURM_NODE, "SLURM_NTASKS_PER_NODE": "8", "SLURM_NTASKS": "32"}, distributed=True)
  launch({**SLURM_NODE, "SLURM_STEP_TASKS_PER_NODE": "8(x4)", "SLURM_NTASKS": "32"},
         distributed=True)


@pytest.mark.parametrize("text, ids", [(None, None), ("", None), ("0", [0]), ("0, 1,3", [0, 1, 3])])
def test_device_ids_parsed(text, ids):
  assert cluster.parse_device_ids(text) == ids


@pytest.mark.parametrize("text", ["a", "0,0", "-1", "0;1"])
def test_bad_device_ids_refused(text):
  with pytest.raises(ConfigError, match="--local_device_ids=.*distinct device ids, e.g. 0,1,2,3"):
    cluster.parse_device_ids(text)


def flag_values(*argv):
  fv = flags.FlagValues()
  cli.define_distributed_flags(fv)
  fv(["prog", *argv])
  return fv


def test_start_distributed_reads_the_scheduler_first():
  with pytest.raises(ConfigError, match="OMPI_COMM_WORLD_SIZE=2"):
    cli.start_distributed(flag_values(), environ={"OMPI_COMM_WORLD_SIZE": "2"})
  with pytest.raises(ConfigError, match="--local_device_ids is a multi-host option"):
    cli.start_distributed(flag_values("--local_device_ids=0,1"), environ={})
  with pytest.raises(ConfigError, match="--local_device_ids='x'"):
    cli.start_distributed(flag_values(), environ={"JAXGUIDE_LOCAL_DEVICE_IDS": "x"})
  cli.start_distributed(flag_values("--single_process"), environ={"SLURM_NTASKS": "2"})   # alone


def two_processes(other: np.ndarray):
  """A gather as process 0 of two sees it, process 1 having contributed `other`."""
  return lambda mine: np.stack([np.asarray(mine), np.asarray(other)])


def test_agree_stops_every_process_when_one_refuses():
  refusal = cluster._encode("--workdir=/w is a file: give a folder")
  with pytest.raises(ConfigError, match=r"process 1 refused the run: --workdir=/w is a file"):
    cluster.agree(lambda: 3, "the run", gather=two_processes(refusal))
  assert cluster.agree(lambda: 3, "the run", gather=two_processes(cluster._encode(""))) == 3

  def own():
    raise ConfigError("data.source='x' is not known")
  with pytest.raises(ConfigError, match="^data.source='x' is not known$"):   # its own line
    cluster.agree(own, "the run", gather=two_processes(cluster._encode("")))

  def crash():
    raise OSError("stale file handle")
  with pytest.raises(OSError):   # raised as it was here; the others get its line
    cluster.agree(crash, "the run", gather=two_processes(cluster._encode("")))
  assert cluster.agree(lambda: 3, "x", gather=lambda a: np.stack([np.asarray(a)])) == 3


def test_agreed_step_is_process_zeros():
  assert cluster.agreed_step(40, gather=two_processes(np.int64(20))) == 40
  assert cluster.agreed_step(None, gather=two_processes(np.int64(20))) is None
  assert cluster.agreed_step(40) == 40   # one process


def test_a_process_that_restored_other_bytes_is_named():
  tree = {"w": np.arange(6, dtype=np.float32), "b": np.zeros(2, np.float32)}
  same = cluster.fingerprint(tree)
  cluster.check_same_tree(tree, "score", 40, gather=two_processes(same))
  other = cluster.fingerprint({"w": np.arange(6, dtype=np.float32), "b": np.ones(2, np.float32)})
  with pytest.raises(ConfigError, match="process 1 restored score step 40 with other contents"):
    cluster.check_same_tree(tree, "score", 40, gather=two_processes(other))


def test_restore_at_the_agreed_step(toy_run):
  """A host restores the step process 0 chose, not its own latest; a step it does not list is a
  one-line refusal."""
  assert wd.latest_step(toy_run, "score") == 40
  at20, latest = wd.restore_latest(toy_run, "score", step=20), wd.restore_latest(toy_run, "score")
  assert int(at20["step"]) == 20 and int(latest["step"]) == 40
  with pytest.raises(checkpoint.CheckpointError, match="step 30, which process 0 restores, is not listed"):
    wd.restore_latest(toy_run, "score", step=30)
  assert wd.latest_step(toy_run, "evaluator") is None


def test_steps_below_the_checkpoint_refused(toy_run):
  """--config.train.steps=20 on a workdir trained to 40 (the config file's models follow
  train.steps)."""
  from configs import toy2d
  config = toy2d.get_config()
  config.train.update({"steps": 20, "batch_size": 64, "log_every": 20, "ckpt_every": 20})
  config.score.model.update({"hidden": 32, "depth": 2})
  config.classifier.model.update({"hidden": 32, "depth": 2})
  config.models = "score,classifier,guide"
  with pytest.raises(ConfigError, match=r"^score.train.steps=20 is below score's checkpoint at step 40 "
                                        r".*give at least 40, or another --workdir$"):
    train_run.prepare(config, toy_run)


# ------------------------------------------------------------------ one training job per workdir


def claim_file(workdir, **fields) -> None:
  """An owner record as another job's Owner writes it."""
  record = {"job": "slurm:999", "host": socket.gethostname(), "pid": os.getppid(),
            "token": "other", "heartbeat": time.time(), **fields}
  (workdir / wd.OWNER_FILE).write_text(json.dumps(record))


def test_a_live_claim_refuses_a_second_job(tmp_path):
  claim_file(tmp_path)   # the parent process: alive, this host
  with pytest.raises(ConfigError, match=r"being trained by job slurm:999 .*delete .*\.jaxguide-owner"):
    wd.check_owner(str(tmp_path))
  with pytest.raises(ConfigError, match="being trained by job slurm:999"):
    with wd.Owner(str(tmp_path)):
      pass
  assert json.loads((tmp_path / wd.OWNER_FILE).read_text())["token"] == "other"   # left alone


@pytest.mark.parametrize("why, fields, environ", [
    ("its process is gone (this host)", {"pid": 2**22 + 1}, {}),
    ("not renewed within the lease", {"host": "elsewhere", "heartbeat": time.time() - wd.LEASE_S - 1}, {}),
    ("the same job, requeued", {"host": "elsewhere"}, {"SLURM_JOB_ID": "999"}),
])
def test_a_dead_or_own_claim_is_taken_over(tmp_path, why, fields, environ):
  claim_file(tmp_path, **fields)
  wd.check_owner(str(tmp_path), environ)
  with wd.Owner(str(tmp_path), environ) as owner:
    held = json.loads((tmp_path / wd.OWNER_FILE).read_text())
    assert held["token"] == owner.record["token"] and held["pid"] == os.getpid(), why
  assert not (tmp_path / wd.OWNER_FILE).exists()


def test_a_claim_is_renewed_and_released_only_by_its_owner(tmp_path, monkeypatch):
  monkeypatch.setattr(wd, "HEARTBEAT_S", 0.01)
  read = lambda: json.loads((tmp_path / wd.OWNER_FILE).read_text())
  with wd.Owner(str(tmp_path)):
    first = read()["heartbeat"]
    deadline = time.time() + 10
    while read()["heartbeat"] == first:
      assert time.time() < deadline, "the claim was not renewed"
      time.sleep(0.01)
  assert not (tmp_path / wd.OWNER_FILE).exists()
  monkeypatch.setattr(wd, "HEARTBEAT_S", 1e6)
  with wd.Owner(str(tmp_path)) as owner:
    claim_file(tmp_path)   # taken over meanwhile (as if this job had looked dead)
    assert not owner.renew()
  assert read()["token"] == "other"   # neither renewed nor removed


def test_a_half_written_claim_counts_until_its_lease_ends(tmp_path):
  (tmp_path / wd.OWNER_FILE).write_text("")
  with pytest.raises(ConfigError, match="being trained by job None"):
    wd.check_owner(str(tmp_path))
  old = time.time() - wd.LEASE_S - 1
  os.utime(tmp_path / wd.OWNER_FILE, (old, old))
  wd.check_owner(str(tmp_path))


def test_training_refuses_a_workdir_another_job_trains(toy_config, tmp_path):
  """train.py's refusal: one line, before anything is written."""
  from jaxguide.training import run
  claim_file(tmp_path)
  with pytest.raises(ConfigError, match="being trained by job slurm:999"):
    run.train(toy_config, str(tmp_path), progress=False)
  assert os.listdir(tmp_path) == [wd.OWNER_FILE]


# ------------------------------------------------------------------ workdirs on object stores


def test_a_workdir_through_the_object_store_path(toy_config, tmp_path, monkeypatch):
  """Every workdir file through the branch a gs:// workdir takes (etils.epath, uploads instead of
  renames, metrics written whole, no O_EXCL claim), on a local folder: training, a resume and
  sampling read back what they wrote."""
  from jaxguide import pipeline
  from jaxguide.cli import train_job
  urls = []
  monkeypatch.setattr(checkpoint, "is_local", lambda path: urls.append(str(path)) or False)
  workdir = str(tmp_path / "run")
  toy_config.models = "score"
  toy_config.train.steps = 20
  train_job.train_and_evaluate(toy_config, workdir, progress=False)
  toy_config.train.steps = 30
  report = train_job.train_and_evaluate(toy_config, workdir, progress=False)
  assert report["score"]["steps"] == 30 and wd.latest_step(workdir, "score") == 30
  steps = [json.loads(l)["step"] for l in open(os.path.join(workdir, wd.METRICS_FILE))]
  assert steps == [10, 20, 30]
  assert not [n for n in os.listdir(workdir) if n.startswith(".")]   # no temporary or claim file
  assert any(u.endswith(wd.METRICS_FILE) for u in urls) and any(u.endswith(wd.OWNER_FILE) for u in urls)
  run = pipeline.load_run(workdir)
  assert run.shape == (2,) and "score" in run.params
