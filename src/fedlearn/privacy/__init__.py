"""Differential privacy for FedLearn: privacy accounting (``accountant``) over Google's dp_accounting.

The accountant's names are re-exported lazily: importing dp_accounting takes about a second, which runs that never
use differential privacy should not pay.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedlearn.privacy.accountant import (
        ACCOUNTANTS,
        SAMPLINGS,
        PrivacyAccountant,
        calibrate_noise_multiplier,
        default_delta,
        effective_noise_multiplier,
    )

__all__ = [
    "ACCOUNTANTS",
    "SAMPLINGS",
    "PrivacyAccountant",
    "calibrate_noise_multiplier",
    "default_delta",
    "effective_noise_multiplier",
]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from fedlearn.privacy import accountant

        return getattr(accountant, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
