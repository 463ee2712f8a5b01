"""Every script in benchmarks/ in its smoke form (tiny networks and sizes, seconds each), so that a
change that breaks one fails here instead of at its next real run: each runs as a subprocess from
the repository root, exits 0 and writes the records and keys its real run writes, with finite
numbers. benchmarks/gpu_check.sh, a GPU driver, is checked for its syntax and for the flags it
passes to the Python commands it calls; benchmarks/torch_nets.py is tests/bench_test.py's.

Most of each run is one core's imports and XLA compiles, so the runs that need no workdir go two
at a time in the background, started when the first test here runs; quality.py, the two scripts
that read its JSON and text_prompts.py run in the tests' own thread on workdirs trained in process
(conftest's toy_run; a toy text run with seeded caption encodings). Every run shares one
persistent compilation cache, so a program that several runs compile (both arms of
cpu_dispatch.py, the tiny training step of cpu_train_step.py and cpu_train_anatomy.py) is
compiled once, and XLA compiles at backend optimisation level 0 (a third less compile time;
nothing checked here depends on how fast the generated code is). The scripts that need torch skip
without it, unless JAXGUIDE_REQUIRE_BENCH=1.
"""
import concurrent.futures
import json
import math
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

import conftest

ROOT = conftest.ROOT
TIMEOUT_S = 600          # per run; a smoke run takes seconds, the margin is for a loaded host
K = 4                    # toy2d's classes
TEXT_DIM = 8             # the toy text run's seeded caption encodings
RUN_RECORDS = {"check_em_unguided_B2_2steps", "check_em_classifier_B2_2steps",
               "check_em_cfg_B2_2steps", "fwd_score_B2", "fwd_classifier_B2",
               "em_classifier_B2_2steps", "train_score_B2", "train_classifier_B2"}


def finite(*values) -> bool:
  return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
             for v in values)


def is_png(path) -> bool:
  with open(path, "rb") as f:
    return f.read(8) == b"\x89PNG\r\n\x1a\n"


def json_lines(text: str) -> list[dict]:
  return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def gpu_check_commands() -> list[list[str]]:
  """The `"$PY" SCRIPT ARGS` commands of gpu_check.sh (pip and -c one-liners aside), each as
  argv from SCRIPT on, continuation lines joined and redirections cut."""
  with open(os.path.join(ROOT, "benchmarks", "gpu_check.sh")) as f:
    text = f.read().replace("\\\n", " ")
  commands = []
  for line in text.splitlines():
    m = re.search(r'"\$PY" (.*)', line)
    if not m:
      continue
    argv = []
    for token in shlex.split(m.group(1)):
      if token.startswith((">", "2>", "<")) or token in ("||", "&&"):
        break
      argv.append(token)
    if argv[:1] in (["-c"], ["-"]) or argv[:2] == ["-m", "pip"]:
      continue
    commands.append(argv)
  return commands


class Runs:
  """The background runs: two at a time, one compilation cache, outputs under `out`."""

  def __init__(self, out: str):
    self.out = out
    self.env = {**os.environ, "JAX_PLATFORMS": "cpu", "CUDA_VISIBLE_DEVICES": "",
                "XLA_FLAGS": "--xla_force_host_platform_device_count=2 "
                             "--xla_backend_optimization_level=0",
                "JAX_COMPILATION_CACHE_DIR": os.path.join(out, "jax-cache"),
                "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    self.pool = concurrent.futures.ThreadPoolExecutor(2)
    self.futures: dict[str, concurrent.futures.Future] = {}

  def __call__(self, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=self.env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)

  def start(self, name: str, argv: list[str]) -> None:
    self.futures[name] = self.pool.submit(self, *argv)

  def result(self, name: str) -> subprocess.CompletedProcess:
    return self.futures[name].result()

  def path(self, name: str) -> str:
    return os.path.join(self.out, name)


# The background runs, longest first: name -> (argv, whether it needs torch). Test `test_NAME`
# reads run NAME; a run starts only where its test is selected.
def background_runs(out: str) -> dict[str, tuple[list[str], bool]]:
  gpu_run = next(argv for argv in gpu_check_commands() if argv[0] == "benchmarks/run.py")
  return {
      "run": (["benchmarks/run.py", "--smoke", "--jax-devices", "2", "--json", f"{out}/run.json",
               "--only", "check_|fwd_|em_classifier|train_"], True),
      "cpu_train_anatomy": (["benchmarks/cpu_train_anatomy.py", "--smoke", "--rounds", "1",
                             "--steps", "1", "--sections", "width,allreduce",
                             "--json", f"{out}/anatomy.json"], True),
      "cpu_sampling": (["benchmarks/cpu_sampling.py", "--smoke", "--batch", "2", "--rounds", "1"],
                       False),
      "cpu_dispatch": (["benchmarks/cpu_dispatch.py", "--runs", "1", "--steps", "2",
                        "--json", f"{out}/dispatch.json"], False),
      "unet_sizes": (["benchmarks/unet_sizes.py", "unet16_r1", "clf16", "--smoke", "--batch", "2",
                      "--repeats", "1"], False),
      "scan_conv": (["benchmarks/scan_conv.py", "--smoke", "--batch", "2"], False),
      "cpu_train_step": (["benchmarks/cpu_train_step.py", "--smoke", "--models", "score",
                          "--devices", "2", "--batches", "4"], False),
      "gpu_check_run_flags": ([a.replace("$OUT", out) for a in gpu_run], True),
      "host_overhead": (["benchmarks/host_overhead.py", "--batches", "8", "--train_steps", "2",
                         "--sample_steps", "2"], False),
      "preemption_check": (["benchmarks/preemption_check.py", "--calls", "10"], False),
  }


@pytest.fixture(scope="session", autouse=True)
def runs(request, tmp_path_factory):
  """Starts the background runs whose tests are selected, before any other fixture of the first
  test here trains a workdir; waits for the started ones at the end."""
  out = str(tmp_path_factory.mktemp("benchmarks"))
  runner = Runs(out)
  here = {item.name for item in request.session.items
          if getattr(getattr(item, "module", None), "__name__", None) == __name__}
  import importlib.util
  has_torch = importlib.util.find_spec("torch") is not None
  for name, (argv, needs_torch) in background_runs(out).items():
    if f"test_{name}" in here and (has_torch or not needs_torch):
      runner.start(name, argv)
  yield runner
  runner.pool.shutdown(wait=True, cancel_futures=True)


def assert_ok(res: subprocess.CompletedProcess) -> None:
  assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"


def ok_json(res: subprocess.CompletedProcess, path: str):
  """The JSON file a run that exited 0 wrote."""
  assert_ok(res)
  with open(path) as f:
    return json.load(f)


# --------------------------------------------------------------------- scripts on a trained workdir


@pytest.fixture(scope="module")
def quality_run(runs, toy_run):
  """quality.py on the toy workdir: every kind it can draw there, 2 DDIM steps, 2 per class."""
  out = runs.path("quality.json")
  res = runs("benchmarks/quality.py", "--workdir", toy_run, "--scale", "none=1", "--scale",
             "cfg=2", "--scale", "classifier=2", "--num_per_class", "2", "--steps", "2",
             "--json", out, "--frontier", runs.path("quality_frontier.png"))
  return res, out


def test_quality(quality_run, toy_run, runs):
  res, out = quality_run
  result = ok_json(res, out)
  assert result["workdir"] == toy_run and result["num_per_class"] == 2
  assert result["options"]["steps"] == 2 and finite(result["sample_s"])
  judge = result["evaluator"]
  assert finite(judge["floor"], judge["test_accuracy"]) and judge["floor"] > 0
  assert [(r["guidance"], r["scale"]) for r in judge["rows"]] == [("none", 1), ("cfg", 2),
                                                                 ("classifier", 2)]
  for r in judge["rows"]:
    assert 0 <= r["accuracy"] <= 1 and finite(r["frechet_distance"], r["diversity"])
    assert sorted(r["per_class"]) == [str(c) for c in range(K)]
  assert set(judge["summary"]) == {"none", "cfg", "classifier"}
  assert all(finite(*s.values()) for s in judge["summary"].values())
  assert [(e["guidance"], e["scale"]) for e in result["errors"]] == [
      (r["guidance"], r["scale"]) for r in judge["rows"]]
  assert is_png(runs.path("quality_frontier.png"))
  # --errors draws images: a toy workdir is refused in one line before anything is drawn.
  refused = runs("benchmarks/quality.py", "--workdir", toy_run, "--errors", runs.path("e.png"))
  assert refused.returncode == 1 and "--errors" in refused.stderr.strip().splitlines()[-1]
  assert not os.path.exists(runs.path("e.png"))


def test_frontier(quality_run, runs):
  _, quality_json = quality_run
  png = runs.path("frontier.png")
  res = runs("benchmarks/frontier.py", quality_json, "--png", png)
  assert_ok(res)
  lines = res.stdout.splitlines()
  assert any(l.startswith("evaluator (FD floor") for l in lines)
  rows = {l.split("|")[1].strip() for l in lines if l.startswith("| ") and "---" not in l}
  # cfg also gets the unguided point as its s = 1; classifier guidance on ε(x,t,∅) does not.
  assert rows == {"kind", "none", "cfg", "classifier"}
  assert is_png(png)


def test_frontier_names_lines_by_a_kinds_own_options(quality_run, runs):
  """A run whose options differ only in a kind's own (APG's momentum) combines, its line named by
  them and given the unguided point; a run with another sampler setting is refused."""
  _, quality_json = quality_run
  with open(quality_json) as f:
    base = json.load(f)
  rows = lambda kind: {j: {**base[j], "rows": [{**r, "guidance": kind} for r in base[j]["rows"]
                                               if r["guidance"] == "cfg"]}
                       for j in ("evaluator",)}
  momentum = {**base, **rows("apg"), "options": {**base["options"], "apg_momentum": -0.5}}
  other = {**base, "options": {**base["options"], "steps": 7}}
  paths = []
  for name, run in (("momentum", momentum), ("other", other)):
    paths.append(runs.path(f"{name}.json"))
    with open(paths[-1], "w") as f:
      json.dump(run, f)
  res = runs("benchmarks/frontier.py", quality_json, paths[0])
  assert_ok(res)
  kinds = [l.split("|")[1].strip() for l in res.stdout.splitlines() if l.startswith("| ")]
  assert "apg apg_momentum=-0.5" in kinds
  scales = next(l for l in res.stdout.splitlines() if l.startswith("| apg apg_momentum")).split("|")[2]
  assert scales.strip() == "1, 2"   # the unguided point as its s = 1
  refused = runs("benchmarks/frontier.py", quality_json, paths[1])
  assert refused.returncode != 0 and "drawn otherwise" in refused.stderr


def test_compare_models(quality_run, runs):
  """Two models' runs under one judge: a summary row per model (named by --name), a passes table
  for the settings drawn at two step counts (edm's Heun steps count twice); another judge's floor
  and a malformed --name are refused."""
  _, quality_json = quality_run
  with open(quality_json) as f:
    base = json.load(f)
  other = {**base, "workdir": "runs/other"}
  edm = {**base, "workdir": "runs/other", "options": {**base["options"], "sampler": "edm", "steps": 3}}
  edm6 = {**edm, "options": {**edm["options"], "steps": 6}}
  floor = {**base, "evaluator": {**base["evaluator"], "floor": base["evaluator"]["floor"] * 2}}
  paths = {}
  for name, run in (("other", other), ("edm", edm), ("edm6", edm6), ("floor", floor)):
    paths[name] = runs.path(f"compare_{name}.json")
    with open(paths[name], "w") as f:
      json.dump(run, f)
  png = runs.path("compare.png")
  res = runs("benchmarks/compare_models.py", quality_json, paths["other"], paths["edm"],
             paths["edm6"], "--judge", "evaluator", "--name", f"{base['workdir']}=toy",
             "--png", png)
  assert_ok(res)
  lines = [l for l in res.stdout.splitlines() if l.startswith("| ") and "---" not in l]
  assert [l.split("|")[1].strip() for l in lines[1:3]] == ["toy (ddim 2)", "runs/other (ddim 2)"]
  header = next(l for l in lines if "passes" in l)
  assert "6 passes" in header and "12 passes" in header     # edm: 2 network passes a step
  assert any(l.startswith("| runs/other, cfg 2 | edm |") for l in lines)
  assert is_png(png)
  refused = runs("benchmarks/compare_models.py", quality_json, paths["floor"], "--judge", "evaluator")
  assert refused.returncode != 0 and "floor" in refused.stderr.strip().splitlines()[-1]
  refused = runs("benchmarks/compare_models.py", quality_json, "--judge", "evaluator", "--name", "x")
  assert refused.returncode == 2 and "--name='x'" in refused.stderr.strip().splitlines()[-1]


def test_quality_curve(quality_run, runs):
  _, quality_json = quality_run
  png = runs.path("curve.png")
  res = runs("benchmarks/quality_curve.py", "--point", f"3={quality_json}",
             "--baseline", "2=0.5,0.9,3", "--out", png)
  assert_ok(res)
  (point,) = json.loads(res.stdout.strip().splitlines()[-1])
  with open(quality_json) as f:
    judge = json.load(f)["evaluator"]
  none = next(r for r in judge["rows"] if r["guidance"] == "none")
  cfg = next(r for r in judge["rows"] if r["guidance"] == "cfg")
  assert point["minutes"] == 3 and point["acc_s1"] == none["accuracy"]
  assert point["best_acc"] == cfg["accuracy"]
  assert point["fd_ratio"] == pytest.approx(cfg["frechet_distance"] / judge["floor"])
  assert is_png(png)


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
  """A toy2d score network on caption encodings, 2 steps: conditions.npz holds seeded unit
  vectors, so neither training nor text_prompts.py opens an encoder (its folder does not exist),
  and 'the digit d' is a training caption, so the negative prompts are cached too."""
  import ml_collections
  from configs import toy2d
  from jaxguide import conditioning
  from jaxguide.cli import train_job
  c = toy2d.get_config()
  c.models = "score"
  c.train.update({"steps": 2, "batch_size": 16, "log_every": 2, "ckpt_every": 2, "warmup_steps": 1})
  c.score.model.update({"hidden": 16, "depth": 1, "cond_dim": TEXT_DIM})
  c.guide.model.update({"cond_dim": TEXT_DIM})
  c.condition = ml_collections.ConfigDict({
      "kind": "text", "encoder_dir": "/nonexistent/encoder", "names": ["zero", "one", "two", "three"],
      "numerals": ["0", "1", "2", "3"], "templates": ["a {name}", "the digit {numeral}"],
      "held_out": ["number {name}"]})
  c.sample.update({"steps": 2, "num_per_class": 1})
  workdir = str(tmp_path_factory.mktemp("text") / "run")
  rows = conditioning.captions(c.condition, K)
  vectors = np.random.default_rng(0).standard_normal((len(rows) + 1, TEXT_DIM)).astype(np.float32)
  vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
  os.makedirs(workdir)
  conditioning.save(workdir, conditioning.Captions(
      np.asarray([r[0] for r in rows]), np.asarray([r[1] for r in rows], np.int32),
      np.asarray([r[2] for r in rows]), vectors[:-1], vectors[-1], "seeded by the test"))
  train_job.train_and_evaluate(c, workdir, progress=False)
  return workdir


def test_text_prompts(text_run, runs):
  out, png = runs.path("text.json"), runs.path("text.png")
  res = runs("benchmarks/text_prompts.py", "--workdir", text_run, "--scales", "1,2",
             "--num_per_prompt", "1", "--negative", "1,2", "--negative_scales", "1,2",
             "--num_negative", "2", "--steps", "2", "--json", out, "--plot", png)
  result = ok_json(res, out)
  assert result["workdir"] == text_run and result["steps"] == 2
  assert (result["held_out_prompts"], result["train_prompts"]) == (K, 2 * K)
  for split in ("held_out", "train"):
    assert [r["scale"] for r in result[split]] == [1, 2]
    for r in result[split]:
      assert 0 <= r["accuracy_evaluator"] <= 1 and finite(r["fd_ratio"])
  assert [(r["digit"], r["scale"]) for r in result["negative"]] == [(1, 1), (1, 2), (2, 1), (2, 2)]
  assert all(0 <= r["share"] <= 1 for r in result["negative"])
  assert is_png(png)


# --------------------------------------------------------------------- gpu_check.sh


def test_gpu_check_syntax_and_flags(capsys):
  """bash -n, the inline summary script compiles, and train.py, sample.py and jaxguide.prepare
  take the flags gpu_check.sh passes (run.py's: test_gpu_check_run_flags)."""
  path = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
  syntax = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
  assert syntax.returncode == 0, syntax.stderr
  with open(path) as f:
    summary = re.search(r"<<'EOF'\n(.*?)\nEOF\n", f.read(), re.S)
  compile(summary.group(1), "gpu_check.sh summary", "exec")
  commands = {argv[0] if argv[0] != "-m" else argv[1]: argv for argv in gpu_check_commands()}
  assert set(commands) == {"jaxguide.prepare", "benchmarks/run.py", "train.py", "sample.py"}
  from cli_test import script_flags
  train = script_flags("train", commands["train.py"][1:])
  assert (train.progress, train.grids) == (False, False) and train.config.models
  sample = script_flags("sample", commands["sample.py"][1:])
  assert (sample.steps, sample.num_per_class, sample.evaluate) == (1000, 50, True)
  from jaxguide.data import prepare
  prepare_args = commands["jaxguide.prepare"][2:]
  with pytest.raises(SystemExit) as done:
    prepare.main(["--help"])
  usage = capsys.readouterr().out
  assert done.value.code == 0
  assert prepare_args[0] in re.search(r"\{([\w,]+)\}", usage).group(1).split(",")
  assert all(a in usage for a in prepare_args[1:] if a.startswith("--"))


def test_gpu_check_run_flags(runs):
  """run.py --preset gpu with gpu_check.sh's flags, on a host whose torch sees no CUDA: past the
  parser (a flag it does not take exits 2), refused because there is no GPU."""
  conftest.need_torch()
  res = runs.result("gpu_check_run_flags")
  assert res.returncode == 1 and "--preset gpu needs CUDA" in res.stderr, res.stderr[-3000:]


# --------------------------------------------------------------------- the background runs


def test_run(runs):
  conftest.need_torch()
  res = runs.result("run")
  records = ok_json(res, runs.path("run.json"))
  by_name = {r["name"]: r for r in records}
  assert set(by_name) == RUN_RECORDS and len(records) == len(RUN_RECORDS)
  for r in records:
    assert finite(r["jax_s"], r["torch_s"], r["ratio"], r["max_abs_diff"]), r
  for name in ("fwd_score_B2", "fwd_classifier_B2", "em_classifier_B2_2steps",
               "train_score_B2", "train_classifier_B2"):
    r = by_name[name]
    assert finite(r["flops"], r["compile_s"], r["peak_fraction"]) and r["flops"] > 0, r
  for role in ("score", "classifier"):
    r = by_name[f"train_{role}_B2"]
    assert finite(r["jax_loss"], r["torch_loss"], r["images_per_s"]), r
    assert r["precision"]["param_dtypes"] == ["float32"] and r["precision"]["ops"], r
  assert by_name["em_classifier_B2_2steps"]["finite"] is True


def test_cpu_train_anatomy(runs):
  conftest.need_torch()
  res = runs.result("cpu_train_anatomy")
  report = ok_json(res, runs.path("anatomy.json"))
  assert set(report) == {"width", "allreduce"}
  assert [r["label"] for r in report["width"]] == ["jaxguide ch=8", "pytorch ch=8"]
  for r in report["width"] + report["allreduce"]:
    assert finite(r["step_ms"]) and r["step_ms"] > 0, r
  gspmd, flat = report["allreduce"]
  # The flat variant's point: one all-reduce of one operand, against one per parameter array.
  assert flat["allreduce_operands"] == 1 < gspmd["allreduce_operands"], report["allreduce"]
  assert gspmd["devices"] == flat["devices"] == 2


def test_cpu_sampling(runs):
  res = runs.result("cpu_sampling")
  assert_ok(res)
  rows = json_lines(res.stdout)
  combos = {(r["part"], r["group_norm"], r["ynnpack"]) for r in rows}
  expected = {("guided step", n, y) for n in ("flax", "jaxguide") for y in ("on", "off")}
  expected |= {(p, n, "on") for p in ("UNet forward", "classifier gradient") for n in ("flax", "jaxguide")}
  assert combos == expected and len(rows) == len(expected)
  for r in rows:
    assert finite(r["ms_per_step"], r["min_ms"], r["compile_s"]) and r["ms_per_step"] > 0, r
    assert (r["batch"], r["devices"]) == (2, 2)


def test_cpu_dispatch(runs):
  res = runs.result("cpu_dispatch")
  report = ok_json(res, runs.path("dispatch.json"))
  assert [r["wait"] for r in report["rows"]] == [False, True]
  for r in report["rows"]:
    assert r["rc"] == 0 and not r["aborted"] and finite(r["images_per_s"]), r
  for name in ("asynchronous dispatch", "one step in flight"):
    s = report["summary"][name]
    assert (s["runs"], s["aborted"], s["other failures"]) == (1, 0, 0), s
    assert finite(s["median_images_per_s"])


def test_unet_sizes(runs):
  res = runs.result("unet_sizes")
  assert_ok(res)
  rows = [line.split(" ", 1) for line in res.stdout.splitlines() if line.strip()]
  assert [name for name, _ in rows] == ["unet16_r1", "clf16"]
  for _, row in rows:
    r = json.loads(row)
    assert r["params"] > 0 and finite(r["compile_s"], r["step_ms_median"], r["img_s_median"]), r


def test_scan_conv(runs):
  res = runs.result("scan_conv")
  assert_ok(res)
  rows = json_lines(res.stdout)
  assert [(r["conv"], r["loop"]) for r in rows] == [
      (c, loop) for c in ("lax", "jaxguide") for loop in ("scan", "unrolled", "python")]
  assert all(finite(r["ms_per_step"]) and r["ms_per_step"] > 0 for r in rows), rows


def test_cpu_train_step(runs):
  res = runs.result("cpu_train_step")
  assert_ok(res)
  (row,) = json_lines(res.stdout)
  assert (row["model"], row["devices"], row["batch"]) == ("score", 2, 4)
  assert finite(row["step_ms"], row["images_per_s"], row["first_step_s"]) and row["step_ms"] > 0


def test_host_overhead(runs):
  res = runs.result("host_overhead")
  assert_ok(res)
  m = re.search(r"batch +8: train loop +([\d.]+) us/step \(bare jitted step +([\d.]+)\) +sample +([\d.]+)",
                res.stdout)
  assert m and all(float(v) > 0 for v in m.groups()), res.stdout
  assert re.search(r"^train_step_us=\d+ sample_step_us=\d+$", res.stdout.strip().splitlines()[-1])


def test_preemption_check(runs):
  res = runs.result("preemption_check")
  assert_ok(res)
  lines = res.stdout.strip().splitlines()
  per_process = [float(re.match(r"process \d: ([\d.]+) us", l).group(1)) for l in lines[:-1]]
  last = float(re.fullmatch(r"sync_point_us=([\d.]+)", lines[-1]).group(1))
  assert len(per_process) == 2 and last == max(per_process) > 0
