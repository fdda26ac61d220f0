"""Export and edge-inference errors a user can cause; each is one line naming the problem and the fix."""

from __future__ import annotations

from fedlearn.errors import FedLearnError


class ExportError(FedLearnError):
    """A run cannot be exported as asked (no final model, unsupported format or option, missing exporter)."""


class EdgeModelError(FedLearnError):
    """A file given to `fedlearn predict` is not a model written by `fedlearn export`, or an image is unreadable."""
