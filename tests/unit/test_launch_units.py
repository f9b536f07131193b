"""Rank placement and worker specs of the Ray launcher (stts_dist/launch/ray_launcher.py), without
any service (the launchers against real Slurm and Ray: tests/e2e/test_launchers.py)."""
from __future__ import annotations

import pytest

from stts_dist.launch.ray_launcher import WorkerPlacement, assign_ranks, resolve_spec


def test_ranks_are_contiguous_per_node_and_local_rank_indexes_the_node_gpus():
    P = WorkerPlacement
    placements = [P("n2", "10.0.0.2", ("3",), 1, 0), P("n1", "10.0.0.1", ("1",), 0, 1),
                  P("n1", "10.0.0.1", ("0",), 0, 0), P("n2", "10.0.0.2", ("2",), 1, 1)]
    envs = assign_ranks(placements, master_port=29999)
    assert [e["RANK"] for e in envs] == ["3", "1", "0", "2"]
    assert [e["LOCAL_RANK"] for e in envs] == ["1", "1", "0", "0"]
    assert [e["NODE_RANK"] for e in envs] == ["1", "0", "0", "1"]
    assert {e["CUDA_VISIBLE_DEVICES"] for e in envs[:1] + envs[3:]} == {"2,3"}
    assert all(e["MASTER_ADDR"] == "10.0.0.1" and e["MASTER_PORT"] == "29999" and e["WORLD_SIZE"] == "4"
               and e["LOCAL_WORLD_SIZE"] == "2" for e in envs)


def test_cpu_workers_get_no_cuda_devices_and_bundle_order():
    envs = assign_ranks([WorkerPlacement("n", "127.0.0.1", (), 0, b) for b in (1, 0)], master_port=1)
    assert [e["RANK"] for e in envs] == ["1", "0"] and all("CUDA_VISIBLE_DEVICES" not in e for e in envs)


def test_worker_spec_defaults_follow_the_cluster():
    gpu_nodes = [{"CPU": 32, "GPU": 8}, {"CPU": 32, "GPU": 8}]
    assert resolve_spec(0, 0, 1.0, "auto", gpu_nodes).__dict__ == dict(
        num_workers=16, workers_per_node=8, cpus_per_worker=1.0, gpus_per_worker=1)
    cpu = resolve_spec(0, 0, 1.0, "auto", [{"CPU": 2.0}])
    assert (cpu.num_workers, cpu.workers_per_node, cpu.gpus_per_worker) == (2, 2, 0)
    with pytest.raises(ValueError, match="multiple of --workers-per-node"):
        resolve_spec(6, 4, 1.0, "auto", gpu_nodes)
    with pytest.raises(ValueError, match="no GPUs"):
        resolve_spec(2, 0, 1.0, "yes", [{"CPU": 2.0}])
