"""Networks (flax.linen): building blocks (`layers`), the ε-prediction UNet (`unet`), the noisy
classifier and the LeNet evaluator (`classifiers`), MLPs for 2-D data (`mlp`), XLA:CPU's
convolution (`conv`), and networks built from a model config (`build`). Conventions in `layers`."""
from jaxguide.models.build import (
                                   ARCHS,
                                   MODEL_INDEX,
                                   PARAMS,
                                   ROLE_ARCHS,
                                   SCORE_ROLES,
                                   build_model,
                                   cond_dim,
                                   example_inputs,
)
from jaxguide.models.classifiers import LeNet, NoisyClassifier
from jaxguide.models.layers import (
                                   AttnBlock,
                                   Conv,
                                   GroupNorm,
                                   ResBlock,
                                   TimeEmbedding,
                                   Upsample,
                                   count_params,
                                   group_norm,
                                   sinusoidal_embedding,
)
from jaxguide.models.mlp import MLP, MLPClassifier, MLPTrunk
from jaxguide.models.unet import Decoder, Encoder, UNet, condition_embedding
