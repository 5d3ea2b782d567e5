"""A user's own loss, registered by name: a train config lists this module under ``imports``."""

from __future__ import annotations

import kdcache


@kdcache.register_loss("scaled_kd")
def scaled_kd(student_logits, targets, labels, *, scale: float = 1.0, temperature: float = 4.0):
    """Pure KD (alpha 1) times ``scale``."""
    return scale * kdcache.kd(student_logits, targets, labels, temperature=temperature, alpha=1.0)
