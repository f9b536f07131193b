"""Launchers: how the distributed trainer (``python -m stts_dist.train``) gets its ranks.

* torchrun / Slurm: ``slurm/train.sh`` runs one torchrun per node (see docs/launch.md).
* Ray: :mod:`stts_dist.launch.ray_launcher` runs one actor per rank in placement groups; submit it
  with ``jobs/submit.py train``.

Every launcher gives each rank the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT) and calls the same entry point, ``stts_dist.train.cli:main``. Importing this package
imports neither Ray nor torch.
"""
