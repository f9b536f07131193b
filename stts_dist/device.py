"""Which torch device a command runs on: one rule for the trainer, stts-eval and stts-infer."""
from __future__ import annotations

import torch


class DeviceError(ValueError):
    """The requested device is not available; the message names the option and the fix."""


def resolve_device(name: str, option: str = "train.device") -> torch.device:
    """``auto`` -> cuda when a GPU is visible, else cpu; ``cuda``/``cuda:N`` must have a GPU.
    ``option`` names the setting in the error (``train.device``, ``--device``)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"{option}={name} but no GPU is visible; use {option}=auto or cpu")
    return torch.device(name)
