"""Errors a user can cause. Each message says what was wrong and what to do instead."""

from __future__ import annotations


class FedLearnError(Exception):
    """Base class: the CLI prints these as one line and exits with code 2."""


class ConfigError(FedLearnError):
    """A configuration value is outside what is allowed."""


class DataError(FedLearnError):
    """A dataset is missing, malformed or cannot be split as asked."""


class ModelError(FedLearnError):
    """A model name is unknown or a model does not fit the data or the other clients."""


class InvalidUpdateError(FedLearnError):
    """A client's result has the wrong size or non-finite values; the server drops it."""


class CheckpointError(FedLearnError):
    """A run directory cannot be resumed (missing or damaged checkpoint)."""


class TaskRefused(FedLearnError):
    """The client will not run this task (it asks for less privacy than the client's policy, or is malformed)."""
