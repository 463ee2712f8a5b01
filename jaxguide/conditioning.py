"""Conditions beyond class labels: one vector per sample, and text prompts through a text encoder.

A score network built with `model.cond_dim = D` (nets.condition_embedding) takes y = condition
vectors (B, D) in place of labels (B,). Every guidance transform takes them as it takes labels,
with the null condition ∅ a fixed vector (D,) (`guidance.null_like`), and the samplers pass y on
unchanged. Training still reads labelled images: `Conditions` turns each label into one of its
class's condition vectors, chosen at random per sample, and condition dropout replaces it by ∅.

config.condition (frozen per workdir):
  kind = "label"   integer labels, ∅ the label num_classes (every preset but mnist_text)
  kind = "text"    captions made from templates per class, encoded once by a sentence encoder
                   (jaxguide.text, all-MiniLM-L6-v2 by default), ∅ the encoding of "":
    encoder_dir    the encoder's folder ("" = text.default_dir(), `python -m jaxguide.prepare minilm`)
    names          one word per class ("zero", ..., "nine"), a template's {name}
    numerals       one numeral per class ("0", ..., "9"), a template's {numeral}
    templates      the training captions' templates, e.g. "a handwritten {name}"
    held_out       templates never trained on: the paraphrases sampling is judged with

The encodings of every caption (and of "") are computed once and cached in the workdir as
`conditions.npz`, so resuming and sampling known captions need no encoder; other prompts are
encoded when asked for.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxguide.errors import ConfigError
from jaxguide.training import workdir as wd

KINDS = ("label", "text")
SPLITS = ("train", "held_out")


@dataclasses.dataclass(frozen=True, eq=False)
class Conditions:
  """Condition vectors for training: `table` (K, T, D) holds T vectors for each of K classes
  (e.g. the encodings of a class's T training captions); `null` (D,) is ∅."""
  table: np.ndarray
  null: np.ndarray

  def __post_init__(self):
    if self.table.ndim != 3 or self.null.shape != self.table.shape[-1:]:
      raise ValueError(f"Conditions: table {self.table.shape} must be (K, T, D) and null "
                       f"{self.null.shape} (D,)")

  @property
  def dim(self) -> int:
    return int(self.table.shape[-1])

  def draw(self, key: jax.Array, labels: jax.Array) -> jax.Array:
    """(B, D): for each label one of its class's T vectors, uniformly at random."""
    pick = jax.random.randint(key, labels.shape, 0, self.table.shape[1])
    return jnp.asarray(self.table, jnp.float32)[labels, pick]

  def first(self, labels: np.ndarray) -> np.ndarray:
    """(B, D): each label's first vector (the first template's caption), for held-out figures."""
    return np.asarray(self.table, np.float32)[np.asarray(labels), 0]

  @classmethod
  def one_hot(cls, num_classes: int) -> "Conditions":
    """Labels as one-hot vectors of size K + 1, ∅ the last basis vector: with these a vector
    network computes exactly what the label network with the same embedding rows computes."""
    eye = np.eye(num_classes + 1, dtype=np.float32)
    return cls(eye[:num_classes, None, :], eye[num_classes])


# ------------------------------------------------------------------------------- text captions


def kind_of(config: ml_collections.ConfigDict) -> str:
  return config.condition.get("kind", "label") if "condition" in config else "label"


def _words(cond: ml_collections.ConfigDict, field: str, num_classes: Optional[int]) -> list[str]:
  words = list(cond.get(field) or [])
  if not words or not all(isinstance(w, str) and w.strip() for w in words):
    raise ConfigError(f"condition.{field}={words!r}: give one non-empty word per class")
  if num_classes is not None and len(words) != num_classes:
    raise ConfigError(f"condition.{field} has {len(words)} entries but the data has {num_classes} "
                      f"classes: give one per class")
  return words


def captions(cond: ml_collections.ConfigDict,
             num_classes: Optional[int] = None) -> list[tuple[str, int, str]]:
  """(caption, class, split) for every template × class, train templates first (template-major:
  caption j·K + k is template j of class k)."""
  names = _words(cond, "names", num_classes)
  numerals = _words(cond, "numerals", len(names))
  out, seen = [], {}
  for split, field in zip(SPLITS, ("templates", "held_out")):
    templates = list(cond.get(field) or [])
    if split == "train" and not templates:
      raise ConfigError("condition.templates is empty: give caption templates such as "
                        "'a handwritten {name}' or 'the digit {numeral}'")
    for i, template in enumerate(templates):
      if not isinstance(template, str) or not re.search(r"\{(name|numeral)\}", template):
        raise ConfigError(f"condition.{field}[{i}]={template!r}: a template must contain {{name}} "
                          "or {numeral}, e.g. 'a handwritten {name}'")
      for k, (name, numeral) in enumerate(zip(names, numerals)):
        try:
          caption = template.format(name=name, numeral=numeral)
        except (KeyError, IndexError, ValueError):
          raise ConfigError(f"condition.{field}[{i}]={template!r}: only {{name}} and {{numeral}} "
                            "may appear in braces") from None
        if caption in seen:
          raise ConfigError(f"condition.{field}[{i}] makes the caption {caption!r} that "
                            f"{seen[caption]} makes too: give each template once")
        seen[caption] = f"condition.{field}[{i}]"
        out.append((caption, k, split))
  return out


def digit_of(prompt: str, cond: ml_collections.ConfigDict) -> Optional[int]:
  """The class a prompt names: the one class whose name or numeral appears in it as a whole
  word (case-insensitive), else None (no class, or several)."""
  names, numerals = _words(cond, "names", None), _words(cond, "numerals", None)
  words = set(re.findall(r"\w+", prompt.lower()))
  hits = {k for k, (n, d) in enumerate(zip(names, numerals)) if n.lower() in words or d.lower() in words}
  return hits.pop() if len(hits) == 1 else None


@dataclasses.dataclass(frozen=True, eq=False)
class Captions:
  """A workdir's cached encodings: captions (N,), their classes and splits, embeddings (N, D),
  the null condition (the encoding of ""), and where the encoder came from."""
  captions: np.ndarray
  labels: np.ndarray
  split: np.ndarray
  embeddings: np.ndarray
  null: np.ndarray
  encoder: str

  @property
  def dim(self) -> int:
    return int(self.embeddings.shape[-1])

  def conditions(self) -> Conditions:
    """The training table (K, T, D): each class's train-template encodings, template order."""
    train = self.split == "train"
    k = int(self.labels.max()) + 1
    table = self.embeddings[train].reshape(-1, k, self.dim).transpose(1, 0, 2)
    return Conditions(np.ascontiguousarray(table, np.float32), self.null.astype(np.float32))

  def lookup(self, prompt: str) -> Optional[int]:
    hits = np.flatnonzero(self.captions == prompt)
    return int(hits[0]) if hits.size else None


def _read_cache(workdir: str) -> Optional[Captions]:
  z = wd.read_conditions(workdir)
  if z is None:
    return None
  try:
    return Captions(z["captions"], z["labels"], z["split"], z["embeddings"], z["null"],
                    str(z["encoder"]))
  except KeyError:
    raise wd.damaged_conditions(workdir) from None


def load_encoder(config: ml_collections.ConfigDict) -> Any:
  """The run's text encoder (condition.encoder_dir, "" = text.default_dir()), loaded once."""
  return _encoder(config.condition.get("encoder_dir") or None)


@functools.lru_cache(maxsize=2)
def _encoder(path: Optional[str]) -> Any:
  from jaxguide import text
  return text.load_encoder(path)


def encode_captions(config: ml_collections.ConfigDict, workdir: str,
                    num_classes: int) -> tuple[Captions, bool]:
  """The workdir's cached encodings if they hold exactly this config's captions, else every
  caption and "" encoded now. Returns (captions, whether they still need writing); checks the
  embedding size against score.model.cond_dim."""
  rows = captions(config.condition, num_classes)
  texts = np.asarray([r[0] for r in rows])
  cached = _read_cache(workdir)
  fresh = cached is None or cached.captions.shape != texts.shape or not np.all(cached.captions == texts)
  if fresh:
    encoder = load_encoder(config)
    vectors = np.asarray(encoder.encode(list(texts) + [""]), np.float32)
    cached = Captions(texts, np.asarray([r[1] for r in rows], np.int32),
                      np.asarray([r[2] for r in rows]), vectors[:-1], vectors[-1],
                      str(getattr(encoder, "path", config.condition.get("encoder_dir", ""))))
  dim = int(config.score.model.get("cond_dim", 0))
  if dim != cached.dim:
    raise ConfigError(f"score.model.cond_dim={dim} but the text encoder gives {cached.dim}-d "
                      f"embeddings: set --config.score.model.cond_dim={cached.dim}")
  return cached, fresh


def for_training(config: ml_collections.ConfigDict, workdir: str,
                 num_classes: int) -> tuple[Optional[Conditions], Optional[Captions], bool]:
  """(training conditions, cached captions, whether to write the cache) of a config; all None
  for label runs. Reads only: train.py writes the cache once the workdir exists (`save`)."""
  if kind_of(config) == "label":
    return None, None, False
  cached, fresh = encode_captions(config, workdir, num_classes)
  return cached.conditions(), cached, fresh


def save(workdir: str, c: Captions) -> None:
  wd.write_conditions(workdir, captions=c.captions, labels=c.labels, split=c.split,
                      embeddings=c.embeddings, null=c.null, encoder=np.asarray(c.encoder))


def load_captions(workdir: str) -> Captions:
  cached = _read_cache(workdir)
  if cached is None:
    raise ConfigError(f"--workdir={workdir} was trained on text but has no {wd.CONDITIONS_FILE}: train it "
                      f"again with python train.py --workdir {workdir} (same --config)")
  return cached


def embed_prompts(config: ml_collections.ConfigDict, cached: Captions,
                  prompts: Sequence[str]) -> np.ndarray:
  """(P, D) encodings of prompts: cached captions read from the workdir, others encoded now."""
  if not prompts:
    raise ConfigError("--prompt: no prompts given: pass --prompt 'a handwritten seven' (repeatable)")
  out = np.zeros((len(prompts), cached.dim), np.float32)
  missing = []
  for i, p in enumerate(prompts):
    j = cached.lookup(p) if p else None
    if p == "":
      out[i] = cached.null
    elif j is not None:
      out[i] = cached.embeddings[j]
    else:
      missing.append(i)
  if missing:
    vectors = np.asarray(load_encoder(config).encode([prompts[i] for i in missing]), np.float32)
    out[missing] = vectors
  return out
