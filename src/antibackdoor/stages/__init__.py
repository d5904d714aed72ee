"""The layer below both ``defenses/`` and ``detectors/``: what a defense composes and what a detector scores with.

- ``context``: ``DefenseContext`` (model factory, device, seed, checkpoints, precision, stage cache, trusted data);
- ``fit``: ``train_stage`` (the one way a stage trains a model), the backdoored model, unlearning;
- ``scores``: per-sample passes over a model (adversarial statistics, losses, features, label agreement);
- ``select``: Otsu's threshold, the one top-fraction rule, the one treatment of isolated samples;
- ``recipes``: the training recipes several parts share;
- ``defensive``: the defensive backdoor (PDB's trigger, augmentation, label map, loss, class-balanced pool) that
  every defense planting one uses;
- the scorers a defense and its detector share, one module per method: ``aabl`` (iFGSM + SCE split), ``aibd``
  (flip counts, Eq. 4, target guess), ``abl`` (bounded-loss isolation), ``dbd`` (SimCLR + SCE warm-up),
  ``separation`` (D-ST/D-BR's FCT split).

Nothing here imports ``defenses`` or ``detectors``.
"""

from .context import DefenseContext, ModelFactory
from .fit import backdoored_model, train_stage, unlearn
from .scores import adversarial_scores, agrees_with_label, sample_features, sample_losses, take_back
from .select import Treatment, otsu_threshold, top_count, top_fraction, treat

__all__ = ["DefenseContext", "ModelFactory", "Treatment", "adversarial_scores", "agrees_with_label",
           "backdoored_model", "otsu_threshold", "sample_features", "sample_losses", "take_back", "top_count",
           "top_fraction", "train_stage", "treat", "unlearn"]
