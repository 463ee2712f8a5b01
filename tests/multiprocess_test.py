"""Several processes with jax.distributed, for real, on 127.0.0.1: 2 processes x 2 CPU devices train
what 1 process x 4 devices trains, a checkpoint of either resumes on the other (a stale listing
included), and only process 0 writes metrics and reports; a SIGTERM
to one process stops all of them at one step, a SIGKILL loses only the steps since the last
checkpoint, and the same command resumes exactly; sample.py on 2 processes writes what 1 writes."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import chex
import numpy as np
import pytest

import conftest
from jaxguide import cli
from jaxguide.cli import train_job
from jaxguide.errors import ConfigError
from tests.cli_test import assert_one_line_error, tree_hash
from tests.reliability_test import last_logged_step, saved_tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 180
# toy2d as tests/conftest.py's toy_config, score network only.
TOY = ["--config=configs/toy2d.py", "--config.models=score", "--config.train.steps=40",
       "--config.train.batch_size=64", "--config.train.log_every=10", "--config.train.ckpt_every=20",
       "--config.train.warmup_steps=5", "--config.train.schedule=constant",
       "--config.score.model.hidden=32", "--config.score.model.depth=2", "--noprogress"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env(devices: int) -> dict:
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": conftest.xla_flags(devices)}


def start(args, devices: int, log_dir, name: str, script: str = "train.py") -> subprocess.Popen:
  """train.py (with TOY) or sample.py, its output in log_dir/name.out and .err."""
  out = open(os.path.join(log_dir, f"{name}.out"), "w")
  err = open(os.path.join(log_dir, f"{name}.err"), "w")
  base = TOY if script == "train.py" else []
  return subprocess.Popen([sys.executable, script, *base, *args], cwd=ROOT, env=env(devices),
                          stdout=out, stderr=err, text=True)


def kill(procs) -> None:
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()


def finish(procs, log_dir, name: str, timeout: float = TIMEOUT_S) -> list[dict]:
  """Waits for processes started as name0, name1, ... (bounded), kills any still running; returns
  each one's exit code, stdout and stderr."""
  try:
    for p in procs:
      p.wait(timeout=timeout)
  finally:
    kill(procs)
  results = []
  for i, p in enumerate(procs):
    read = lambda ext: open(os.path.join(log_dir, f"{name}{i}.{ext}")).read()
    results.append({"rc": p.returncode, "out": read("out"), "err": read("err")})
  return results


def launch(args_per_process, devices: int, log_dir, name: str,
           script: str = "train.py") -> list[dict]:
  """Starts one script per argument list, waits for all (bounded), kills all if any fails or
  runs over; returns each one's exit code, stdout and stderr."""
  procs = [start(args, devices, log_dir, f"{name}{i}", script)
           for i, args in enumerate(args_per_process)]
  return finish(procs, log_dir, name)


def distributed(n: int, port: int, *extra) -> list[list[str]]:
  return [[f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n}", f"--process_id={i}",
           *extra] for i in range(n)]


GLOO_LINE = re.compile(r"\[Gloo\] Rank \d+ is connected to \d+ peer ranks\.|"
                       r"Expected number of connected peer ranks is : \d+")


def quiet(text: str) -> bool:
  """Nothing but gloo's own connection lines (printed by its C++ side on every process; two
  processes' lines may interleave mid-line, so the message is removed wherever it stands)."""
  return not GLOO_LINE.sub("", text).strip()


# Process 1 of a run whose listing of the shared workdir is stale: it sees no checkpoint at all.
STALE_LISTING = ("import os, runpy, sys; os.environ['GLIBC_TUNABLES'] = ''; "
                 "from jaxguide.training import workdir; "
                 "workdir.latest_step = lambda w, n: print('stale listing', file=sys.stderr); "
                 "sys.argv = ['train.py'] + sys.argv[1:]; runpy.run_path('train.py', run_name='__main__')")


def start_stale(args, devices: int, log_dir, name: str) -> subprocess.Popen:
  out = open(os.path.join(log_dir, f"{name}.out"), "w")
  err = open(os.path.join(log_dir, f"{name}.err"), "w")
  return subprocess.Popen([sys.executable, "-c", STALE_LISTING, *TOY, *args], cwd=ROOT,
                          env=env(devices), stdout=out, stderr=err, text=True)


@pytest.mark.cpu_exact
@pytest.mark.integration
def test_two_processes_of_two_devices_equal_one_of_four_and_resume_across(tmp_path):
  """Two runs of 40 steps, each in two halves: 2 processes x 2 devices then 1 process x 4, and 1
  x 4 then 2 x 2, where process 1 of the second half lists no checkpoint (a stale listing of the
  shared folder) and restores process 0's step anyway. Both halves of both runs agree to 1e-6
  (one global batch of 64 over 4 devices either way), each step is logged once, and only
  process 0 writes or prints."""
  from tests.train_test import final_tree
  a, b, logs = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path)
  half = "--config.train.steps=20"
  single = start([f"--workdir={b}", "--nogrids", half], 4, logs, "b_first0")   # beside a's first half
  runs = launch(distributed(2, free_port(), f"--workdir={a}", "--nogrids", half), 2, logs, "a_first")
  [first_b] = finish([single], logs, "b_first")
  assert all(r["rc"] == 0 for r in runs + [first_b]), [r["err"][-2000:] for r in runs + [first_b]]
  assert quiet(runs[1]["out"]) and quiet(runs[1]["err"]), runs[1]
  chex.assert_trees_all_close(final_tree(a), final_tree(b), atol=1e-6, rtol=0)

  single = start([f"--workdir={a}", "--nogrids"], 4, logs, "a_second0")
  args = distributed(2, free_port(), f"--workdir={b}", "--nogrids")
  procs = [start(args[0], 2, logs, "b_second0"), start_stale(args[1], 2, logs, "b_second1")]
  runs = finish(procs, logs, "b_second") + finish([single], logs, "a_second")
  assert all(r["rc"] == 0 for r in runs), [r["err"][-2000:] for r in runs]
  ta, tb = final_tree(a), final_tree(b)
  assert int(ta["step"]) == int(tb["step"]) == 40
  chex.assert_trees_all_close(ta, tb, atol=1e-6, rtol=0)
  read = lambda w: [json.loads(l) for l in open(os.path.join(w, "metrics.jsonl"))]
  assert [r["step"] for r in read(a)] == [r["step"] for r in read(b)] == [10, 20, 30, 40]
  assert [r["loss"] for r in read(a)] == pytest.approx([r["loss"] for r in read(b)], abs=1e-6)
  report = json.loads(runs[0]["out"][runs[0]["out"].index("{"):])
  assert report["score"]["steps"] == 40
  stale_err = runs[1]["err"].replace("stale listing\n", "")
  assert "stale listing" in runs[1]["err"] and quiet(runs[1]["out"]) and quiet(stale_err), runs[1]


def test_other_processes_write_only_checkpoints(toy_config, tmp_path, monkeypatch):
  """What a process other than 0 leaves in the workdir: its part of the checkpoints, nothing else."""
  toy_config.models = "score"
  toy_config.train.steps = 20
  from jaxguide.training import loop, run
  for module in (loop, run):
    monkeypatch.setattr(module, "is_primary", lambda: False)
  train_job.train_and_evaluate(toy_config, str(tmp_path), progress=False)
  assert sorted(os.listdir(tmp_path)) == ["checkpoints"]


@pytest.mark.integration
def test_refused_before_anything_is_written(tmp_path):
  """train.num_devices with several processes, and a global batch the devices do not divide:
  every process exits 2 with one line, and the workdir is not created."""
  for name, override in (("devices", "--config.train.num_devices=1"),
                         ("batch", "--config.train.batch_size=63")):
    workdir = tmp_path / name
    runs = launch(distributed(2, free_port(), f"--workdir={workdir}", override, "--nogrids"), 1,
                  str(tmp_path), name)
    for r in runs:
      lines = [l for l in r["err"].splitlines() if l.strip()]
      assert r["rc"] == 2 and len(lines) == 1 and lines[0].startswith("error: "), r
    assert "num_devices" in runs[0]["err"] if name == "devices" else "63" in runs[0]["err"]
    assert not workdir.exists()


@pytest.mark.integration
def test_one_host_refusing_stops_every_process_at_once(tmp_path):
  """Per-host input that only process 1 refuses (its --workdir a file, as a host-local path or a
  failed NFS read would be): both exit 2 within seconds instead of process 0 waiting in the first
  collective; process 0's line names process 1 and its reason; nothing is written."""
  (tmp_path / "file").write_text("")
  args = distributed(2, free_port(), "--nogrids")
  args[0].append(f"--workdir={tmp_path / 'run'}")
  args[1].append(f"--workdir={tmp_path / 'file'}")
  t0 = time.time()
  runs = launch(args, 1, str(tmp_path), "host")
  assert time.time() - t0 < 30   # the start of two interpreters included; the wait was > 120 s
  for r in runs:
    lines = [l for l in r["err"].splitlines() if l.strip()]
    assert r["rc"] == 2 and len(lines) == 1 and lines[0].startswith("error: "), r
  assert "process 1 refused the run" in runs[0]["err"] and "file" in runs[0]["err"], runs[0]
  assert not (tmp_path / "run").exists()


@pytest.mark.integration
def test_a_workdir_not_shared_is_refused(tmp_path):
  """Each process given its own folder, as a host-local path on every host would be: process 0's
  token is not seen by process 1, and both exit 2 with one line naming the workdir."""
  args = distributed(2, free_port(), "--nogrids")
  for i, a in enumerate(args):
    a.append(f"--workdir={tmp_path / f'local{i}'}")
  runs = launch(args, 1, str(tmp_path), "local")
  for r in runs:
    lines = [l for l in r["err"].splitlines() if l.strip()]
    assert r["rc"] == 2 and len(lines) == 1 and "not the folder process 0 wrote" in lines[0], r
  assert "process 1 refused --workdir=" in runs[0]["err"], runs[0]


@pytest.mark.parametrize("args, message", [
    ((None, 2, None), "--coordinator_address, --process_id missing"),
    (("127.0.0.1:1234", 2, 2), "--process_id=2 is out of range for --num_processes=2"),
    (("127.0.0.1:1234", 2, -1), "--process_id=-1 is out of range"),
    (("127.0.0.1", 2, 0), "give HOST:PORT"),
    (("127.0.0.1:1234", 0, 0), "--num_processes=0"),
])
def test_distributed_flags_checked(args, message):
  with pytest.raises(ConfigError, match=message):
    cli.distributed_args(*args)


def test_distributed_flags_passed():
  assert cli.distributed_args(None, None, None) is None
  assert cli.distributed_args("10.0.0.1:1234", 4, 3) == {
      "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3}


# ---------------------------------------------- preemption and resume; sampling across processes

# The preemption runs and the trained run the sampling tests read: STEPS steps, a checkpoint
# every CKPT; train.py's final grids (where the run gets to them) tiny.
STEPS, CKPT = 120, 30
LONG = [f"--config.train.steps={STEPS}", f"--config.train.ckpt_every={CKPT}", "--config.sample.steps=10",
        "--config.sample.num_per_class=4"]
SAMPLE = ["--steps=10", "--num_per_class=4", "--guidance=cfg", "--scale=1,3", "--evaluate"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """The uninterrupted STEPS-step run (1 process x 2 devices, which 2 processes x 1 device equal),
  started at once so that it runs beside the first test that asks for it; calling the fixture's
  value waits for it and returns its workdir, also the trained run the sampling tests read."""
  logs = tmp_path_factory.mktemp("straight")
  workdir = str(logs / "run")
  proc = start([f"--workdir={workdir}", *LONG, "--nogrids"], 2, str(logs), "straight0")

  def wait() -> str:
    [result] = finish([proc], str(logs), "straight")
    assert result["rc"] == 0, result["err"][-3000:]
    return workdir
  yield wait
  kill([proc])


def wait_until(condition, procs, timeout: float = TIMEOUT_S) -> None:
  """Polls `condition` until it holds; fails (killing procs) if one of them exits first or time runs out."""
  deadline = time.time() + timeout
  while not condition():
    if any(p.poll() is not None for p in procs) or time.time() > deadline:
      kill(procs)
      pytest.fail(f"gave up waiting: exit codes {[p.returncode for p in procs]}")
    time.sleep(0.05)


def complete_steps(workdir) -> list[int]:
  """Checkpoints orbax has finalized (its unfinished saves carry a suffix)."""
  directory = os.path.join(workdir, "checkpoints", "score")
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit()) if os.path.isdir(directory) else []


def logged_steps(workdir) -> list[int]:
  return [json.loads(l)["step"] for l in open(os.path.join(workdir, "metrics.jsonl"))]


@pytest.mark.cpu_exact
@pytest.mark.integration
def test_sigterm_to_one_process_stops_all_at_one_step_and_sigkill_resumes_exactly(straight, tmp_path):
  """One chain of the same 2-process command: a SIGTERM to process 1 mid-run stops both after the
  same step (each saves its part of that checkpoint, both exit with PREEMPTED_EXIT); then a SIGKILL of process 0 after
  the next checkpoint (process 1 is stopped, bounded); then the command again ends equal to the
  uninterrupted run, each step logged once."""
  workdir, logs = str(tmp_path / "run"), str(tmp_path)
  command = lambda: distributed(2, free_port(), f"--workdir={workdir}", *LONG)
  procs = [start(args, 1, logs, f"term{i}") for i, args in enumerate(command())]
  wait_until(lambda: os.path.exists(os.path.join(workdir, "metrics.jsonl")) and
             last_logged_step(workdir) >= 10, procs)
  # jax's notifier in process 1 looks for the signal once a second. Meanwhile process 0 is held
  # (SIGSTOP), and without it no process can take a step: the stop comes within a few steps of
  # the signal's, on a machine of any speed.
  procs[0].send_signal(signal.SIGSTOP)
  procs[1].send_signal(signal.SIGTERM)
  time.sleep(1.5)
  procs[0].send_signal(signal.SIGCONT)
  runs = finish(procs, logs, "term")
  for r in runs:
    assert r["rc"] == cli.PREEMPTED_EXIT and "Traceback" not in r["err"], r["err"][-3000:]
  stopped = int(re.search(r"saved at step (\d+)", runs[0]["err"])[1])
  assert 10 < stopped < STEPS, stopped   # mid-run: after the signal's step, before the end
  assert complete_steps(workdir)[-1] == stopped
  shares = os.listdir(os.path.join(workdir, "checkpoints", "score", str(stopped), "default"))
  assert {"ocdbt.process_0", "ocdbt.process_1"} <= set(shares), shares   # both saved that step
  assert logged_steps(workdir) == list(range(10, stopped + 1, 10))
  assert quiet(runs[1]["out"]), runs[1]["out"]

  procs = [start(args, 1, logs, f"kill{i}") for i, args in enumerate(command())]
  following = (stopped // CKPT + 1) * CKPT
  wait_until(lambda: complete_steps(workdir)[-1] >= following, procs)
  procs[0].kill()
  procs[0].wait()
  try:   # the survivor waits in its next collective (on a cluster the scheduler ends it): bounded
    procs[1].wait(timeout=5)
  except subprocess.TimeoutExpired:
    kill(procs)
  assert procs[0].returncode == -signal.SIGKILL
  assert complete_steps(workdir)[-1] < STEPS

  runs = launch(command(), 1, logs, "again")
  for r in runs:
    assert r["rc"] == 0, r["err"][-3000:]
  (step_a, a), (step_b, b) = saved_tree(straight()), saved_tree(workdir)
  assert step_a == step_b == STEPS
  chex.assert_trees_all_close(a, b, atol=1e-6, rtol=0)
  assert logged_steps(workdir) == list(range(10, STEPS + 1, 10))
  # The final grids, sampled by both processes, written and reported by process 0 alone.
  report = json.loads(runs[0]["out"][runs[0]["out"].index("{"):])
  assert report["grids"]["cfg"]["files"][0] == os.path.join(workdir, "samples", "cfg", "samples.npz")
  assert len(np.load(report["grids"]["cfg"]["files"][0])["image"]) == 16
  assert quiet(runs[1]["out"]) and quiet(runs[1]["err"]), runs[1]


@pytest.mark.integration
def test_sample_two_processes_write_what_one_process_writes(straight, tmp_path):
  """sample.py on 2 processes x 1 device: process 0 writes samples.npz equal to 1 process x 2
  devices' (the same global mesh), the same files and report; process 1 writes and prints nothing
  (its --out is its own here, so that anything it wrote would show)."""
  workdir, logs = straight(), str(tmp_path)
  one = start([f"--workdir={workdir}", f"--out={tmp_path / 'one'}", *SAMPLE], 2, logs, "one0",
              script="sample.py")
  outs = [tmp_path / "out0", tmp_path / "out1"]
  runs = launch([args + [f"--out={outs[i]}"] for i, args in
                 enumerate(distributed(2, free_port(), f"--workdir={workdir}", *SAMPLE))], 1, logs,
                "sample", script="sample.py")
  [single] = finish([one], logs, "one")
  for r in runs + [single]:
    assert r["rc"] == 0, r["err"][-3000:]
  a, b = np.load(tmp_path / "one" / "samples.npz"), np.load(outs[0] / "samples.npz")
  assert sorted(a.files) == sorted(b.files) and len(a["image"]) == 32
  for k in a.files:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert sorted(os.listdir(tmp_path / "one")) == sorted(os.listdir(outs[0]))
  judged = lambda d: {k: v for k, v in json.loads((d / "report.json").read_text()).items()
                      if k in ("report", "reference")}
  assert judged(tmp_path / "one") == judged(outs[0])
  assert json.loads(runs[0]["out"][runs[0]["out"].index("{"):])["samples"] == 32
  assert not outs[1].exists()
  assert quiet(runs[1]["out"]) and quiet(runs[1]["err"]), runs[1]


@pytest.mark.integration
def test_sample_refusals_write_nothing(straight, tmp_path):
  """sample.py's bad distributed input: the flags half given (one process), and on 2 processes a
  call of 3 samples that 2 devices cannot split. One line, exit 2, no --out, the workdir as it was."""
  workdir, logs = straight(), str(tmp_path)
  before = tree_hash(workdir)
  half = start([f"--workdir={workdir}", f"--out={tmp_path / 'half'}", "--num_processes=2"], 1, logs,
               "half0", script="sample.py")
  runs = launch(distributed(2, free_port(), f"--workdir={workdir}", f"--out={tmp_path / 'odd'}",
                            "--labels=0", "--num_per_class=3", "--steps=2"), 1, logs, "odd",
                script="sample.py")
  [single] = finish([half], logs, "half")
  assert_one_line_error(result(single), "--coordinator_address, --process_id missing")
  for r in runs:
    assert_one_line_error(result(r), "--num_per_class=3")
  assert "e.g. --num_per_class=4" in runs[0]["err"]
  assert not (tmp_path / "half").exists() and not (tmp_path / "odd").exists()
  assert tree_hash(workdir) == before


def result(run: dict) -> subprocess.CompletedProcess:
  return subprocess.CompletedProcess([], run["rc"], run["out"], run["err"])
