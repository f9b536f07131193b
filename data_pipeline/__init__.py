"""Video data pipeline: manifest -> Ray sharding job -> WebDataset shards -> DP-aware loader.

Kept import-light on purpose: ``import data_pipeline`` must not pull in Ray, PyAV or torch.
Import the submodules you need:

- :mod:`data_pipeline.manifest`       strict JSONL manifest parsing (``ManifestError``)
- :mod:`data_pipeline.config`         ``ShardingConfig`` / ``LoaderConfig`` (OmegaConf dataclasses)
- :mod:`data_pipeline.build_shards`   the Ray sharding job and ``ensure_shards``
- :mod:`data_pipeline.synth_digits`   synthetic mp4 + manifest writer
- :mod:`data_pipeline.loader`         ``VideoLoader``: resumable, DP-rank-aware WebDataset loader
"""
