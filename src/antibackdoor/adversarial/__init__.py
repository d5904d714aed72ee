"""The batched PGD/iFGSM engine and the losses it uses."""

from .losses import per_sample_loss, symmetric_cross_entropy
from .pgd import PGDConfig, PGDResult, PGDStats, adversarial_examples, eval_mode, pgd, pgd_statistics

__all__ = ["PGDConfig", "PGDResult", "PGDStats", "adversarial_examples", "eval_mode", "per_sample_loss", "pgd",
           "pgd_statistics", "symmetric_cross_entropy"]
