"""``antibackdoor defend``: a defense on a practitioner's own, untrusted data (see job.py)."""

from .job import DefendConfig, Defender, make_defend_config, run_defend

__all__ = ["DefendConfig", "Defender", "make_defend_config", "run_defend"]
