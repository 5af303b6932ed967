"""Exceptions moeray raises at its boundaries. Each message names the offending value."""


class MoerayError(RuntimeError):
    """Base class for moeray's own errors."""


class CollectiveError(MoerayError):
    """A collective failed: a peer died, timed out, or the group is not set up."""


class WorkerLost(MoerayError):
    """A worker actor died or stopped answering within its timeout."""


class CheckpointError(MoerayError, ValueError):
    """A checkpoint is missing a tensor or holds one of the wrong shape or dtype."""
