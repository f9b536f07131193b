import importlib.util
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(2)

SLOW_DIRS = ("multiprocess", "e2e")


def pytest_collection_modifyitems(config, items):
    """Every test under tests/multiprocess and tests/e2e is slow by where it lives (rank groups,
    torchrun, services); heavy unit tests carry the marker themselves. ``-m "not slow"`` is the
    developer's fast loop."""
    for item in items:
        if item.path.parent.name in SLOW_DIRS:
            item.add_marker(pytest.mark.slow)


def load_tool(name: str):
    """A script under tools/ imported as a module (tools/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "tools" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_overrides(**extra):
    """A model small enough for unit tests (dims in the spirit of the default job)."""
    ov = {
        "model.vit.image_size": 32, "model.vit.patch_size": 8, "model.vit.width": 32, "model.vit.depth": 4,
        "model.vit.heads": 2, "model.vit.mlp_dim": 64, "model.connector.pool_size": 2, "model.connector.pool_heads": 2,
        "model.llm.hidden": 32, "model.llm.layers": 2, "model.llm.heads": 4, "model.llm.kv_heads": 2,
        "model.llm.ffn": 64, "model.stts.prune_at": 1, "model.stts.scorer_hidden": 32, "model.stts.scorer_heads": 2,
        "data.num_frames": 4, "data.min_frames": 0, "data.train_samples": 64, "data.eval_samples": 8, "data.num_workers": 0,
        "train.batch_size": 4, "train.progress_bar": False, "train.log_every": 1000, "tracking.enabled": False,
    }
    ov.update(extra)
    return [f"{k}={v}" for k, v in ov.items()]


@pytest.fixture
def tiny_cfg():
    from stts_dist.config import load_config
    return load_config(None, tiny_overrides())
