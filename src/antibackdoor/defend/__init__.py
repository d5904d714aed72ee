"""``antibackdoor defend``: a defense on a practitioner's own, untrusted data (see job.py)."""

from .job import Defender, run_defend
from .prepare import DefendConfig, DefendSetup, make_defend_config

__all__ = ["DefendConfig", "DefendSetup", "Defender", "make_defend_config", "run_defend"]
