"""Error types of the data pipeline.

Every class takes a single message argument so instances survive pickling across Ray tasks and
torch DataLoader workers (both re-raise the worker's exception in the parent process).
"""
from __future__ import annotations


class DataPipelineError(Exception):
    """Base class: something about the data (not the code) is wrong; the message says what."""


class ManifestError(DataPipelineError, ValueError):
    """A manifest line is malformed; the message names the file, line number and key."""


class VideoReadError(DataPipelineError):
    """One video could not be turned into frames. The sharding job skips the sample and lists
    it in ``errors.jsonl``; ``kind`` is a short machine-readable reason."""

    def __init__(self, message: str, kind: str = "unreadable"):
        super().__init__(message)
        self.kind = kind

    def __reduce__(self):
        return (type(self), (self.args[0], self.kind))


class ShardingError(DataPipelineError):
    """The sharding job as a whole cannot proceed (conflicting output folder, failed units)."""


class ShardFormatError(DataPipelineError):
    """A shard is truncated, corrupt or does not match its index; the message names the shard."""


class UnsafeMemberError(ShardFormatError):
    """A shard holds a member type this project never writes (e.g. a pickled ``.pyd``); it is
    rejected before anything is decoded."""


class DatasetIndexError(DataPipelineError):
    """``index.json`` of a shard folder is missing or inconsistent."""
