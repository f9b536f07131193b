"""Distributed training on a Ray cluster: the entry point of the Ray job.

    python -m stts_dist.launch.ray_launcher --config jobs/train_7b.yaml --num-workers 16 [key=value ...]

Run by ``jobs/submit.py train`` (or ``ray job submit ... -- python -m stts_dist.launch.ray_launcher``)
on the cluster. It places one actor per rank (one per GPU; one per ``--cpus-per-worker`` CPUs on a
CPU cluster) in placement groups of ``--workers-per-node`` bundles with strategy STRICT_PACK (one
group = one node, so a TP group never spans nodes), gives every actor the torchrun environment
(RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, NODE_RANK, MASTER_ADDR, MASTER_PORT) and calls the
same entry point torchrun and Slurm run, ``stts_dist.train.cli:main``, inside each actor.

The first rank that raises or exits non-zero fails the job: its exception (with the remote
traceback) is printed, the other ranks are killed (they would otherwise wait in a collective until
the timeout) and the driver exits non-zero, so ``ray job status`` shows FAILED.
"""
from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

#: Set in every rank's environment, so the trainer can record how it was launched.
LAUNCHER_ENV = "STTS_LAUNCHER"


@dataclass(frozen=True)
class WorkerPlacement:
    """Where an actor landed, as it reports it."""

    node_id: str
    node_ip: str
    gpu_ids: tuple[str, ...]    # Ray's GPU ids of this actor (empty on CPU)
    group: int                  # placement group index
    bundle: int                 # bundle index inside the group


def assign_ranks(placements: Sequence[WorkerPlacement], master_port: int) -> list[dict[str, str]]:
    """torchrun-style environment of every actor (same order as ``placements``).

    Ranks are contiguous per node (nodes in order of their first placement group, then by GPU id
    or bundle), so global rank = node_rank * local_world_size + local_rank, as with torchrun. With
    GPUs every actor of a node sees all GPUs of the node's actors (CUDA_VISIBLE_DEVICES) and
    LOCAL_RANK indexes its own one, so ``torch.cuda.set_device(LOCAL_RANK)`` works and NCCL can
    use peer-to-peer links between them."""
    if not placements:
        raise ValueError("no workers to assign ranks to")
    nodes: dict[str, list[int]] = {}
    for i, p in sorted(enumerate(placements), key=lambda ip: (ip[1].group, ip[1].bundle)):
        nodes.setdefault(p.node_id, []).append(i)

    def order_key(i: int) -> tuple:
        p = placements[i]
        gpu = p.gpu_ids[0] if p.gpu_ids else ""
        # numeric ids in numeric order; UUID-style ids (CUDA_VISIBLE_DEVICES=GPU-...) as text
        return (int(gpu) if gpu.isdigit() else -1, gpu, p.group, p.bundle)

    ordered = [sorted(members, key=order_key) for members in nodes.values()]
    world = len(placements)
    master_ip = placements[ordered[0][0]].node_ip
    envs: list[dict[str, str]] = [{} for _ in placements]
    rank = 0
    for node_rank, members in enumerate(ordered):
        node_gpus = [g for i in members for g in placements[i].gpu_ids]
        for local_rank, i in enumerate(members):
            env = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local_rank),
                   "LOCAL_WORLD_SIZE": str(len(members)), "NODE_RANK": str(node_rank),
                   "GROUP_RANK": str(node_rank), "MASTER_ADDR": master_ip, "MASTER_PORT": str(master_port),
                   LAUNCHER_ENV: "ray"}
            if node_gpus:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(node_gpus)
                env["LOCAL_RANK"] = str(node_gpus.index(placements[i].gpu_ids[0]))
            envs[i] = env
            rank += 1
    return envs


class TrainWorker:
    """One rank. Runs in its own Ray worker process; ``run`` executes on that process's main
    thread, so the trainer can install its signal handlers."""

    def __init__(self, group: int, bundle: int):
        self.group, self.bundle = group, bundle

    def placement(self) -> WorkerPlacement:
        import ray
        ctx = ray.get_runtime_context()
        gpu_ids = tuple(str(g) for g in ray.get_gpu_ids())
        return WorkerPlacement(ctx.get_node_id(), ray.util.get_node_ip_address(), gpu_ids, self.group, self.bundle)

    def free_port(self) -> int:
        """A port that is free on this node now (for MASTER_ADDR's rendezvous store)."""
        with socket.socket() as s:
            s.bind(("", 0))
            return int(s.getsockname()[1])

    def run(self, env: dict[str, str], argv: list[str]) -> int:
        """Set the rank's environment (before torch touches CUDA) and run the training CLI."""
        os.environ.update(env)
        from stts_dist.train.cli import main
        try:
            code = main(argv)
        except SystemExit as e:  # sys.exit inside the trainer (e.g. 143 after a signal)
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        return int(code or 0)


@dataclass(frozen=True)
class WorkerSpec:
    num_workers: int
    workers_per_node: int
    cpus_per_worker: float
    gpus_per_worker: int        # 0 or 1

    @property
    def groups(self) -> int:
        return self.num_workers // self.workers_per_node


def resolve_spec(num_workers: int, workers_per_node: int, cpus_per_worker: float, use_gpu: str,
                 nodes: list[dict[str, float]]) -> WorkerSpec:
    """Fill in the defaults from the alive nodes' resources (``[{"CPU": 8, "GPU": 8}, ...]``)."""
    if cpus_per_worker <= 0:
        raise ValueError(f"--cpus-per-worker={cpus_per_worker} must be > 0")
    total_gpus = sum(n.get("GPU", 0) for n in nodes)
    if use_gpu not in ("auto", "yes", "no"):
        raise ValueError(f"--use-gpu={use_gpu!r} must be auto, yes or no")
    gpu = use_gpu == "yes" or (use_gpu == "auto" and total_gpus > 0)
    if gpu and total_gpus == 0:
        raise ValueError("--use-gpu=yes but the Ray cluster has no GPUs; use --use-gpu=auto or no")

    def per_node(n: dict[str, float]) -> int:
        return int(n.get("GPU", 0)) if gpu else int(n.get("CPU", 0) // cpus_per_worker)

    capacity = [per_node(n) for n in nodes]
    if not num_workers:
        num_workers = sum(capacity)
        if num_workers == 0:
            raise ValueError(f"no room for a single worker ({'1 GPU' if gpu else f'{cpus_per_worker:g} CPUs'} "
                             f"each) on the cluster's nodes {nodes}")
    if not workers_per_node:
        workers_per_node = min(num_workers, max(capacity) if capacity else num_workers)
        while num_workers % workers_per_node:   # the largest group size that divides the workers
            workers_per_node -= 1
    if num_workers < 1 or workers_per_node < 1:
        raise ValueError(f"--num-workers={num_workers} and --workers-per-node={workers_per_node} must be >= 1")
    if num_workers % workers_per_node:
        raise ValueError(f"--num-workers={num_workers} must be a multiple of --workers-per-node={workers_per_node} "
                         "(every node runs the same number of ranks)")
    return WorkerSpec(num_workers, workers_per_node, cpus_per_worker, 1 if gpu else 0)


class RankFailed(RuntimeError):
    def __init__(self, rank: int, node_ip: str, cause: str, exit_code: int = 1):
        super().__init__(f"rank {rank} (on {node_ip}) failed: {cause}")
        self.rank, self.exit_code = rank, exit_code


def _wait_for_ranks(refs: list[Any], ranks: list[int], node_ips: list[str]) -> None:
    """Block until every rank returned 0; raise :class:`RankFailed` for the first that did not."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    pending = {ref: i for i, ref in enumerate(refs)}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(done[0])
        rank, ip = ranks[i], node_ips[i]
        try:
            code = ray.get(done[0])
        except RayTaskError as e:
            raise RankFailed(rank, ip, f"{type(e.cause).__name__ if e.cause else 'exception'}\n{e}") from None
        except RayActorError as e:
            raise RankFailed(rank, ip, f"its worker process died: {e}") from None
        if code != 0:
            raise RankFailed(rank, ip, f"the trainer exited with code {code} (its output is above)", code)


def launch(spec: WorkerSpec, train_argv: list[str], placement_timeout_s: float = 120.0) -> int:
    """Place the workers, run the trainer on all of them, return the job's exit code."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundle = {"CPU": spec.cpus_per_worker}
    if spec.gpus_per_worker:
        bundle["GPU"] = spec.gpus_per_worker
    groups = [placement_group([dict(bundle)] * spec.workers_per_node, strategy="STRICT_PACK")
              for _ in range(spec.groups)]
    actors: list[Any] = []
    try:
        ready, _ = ray.wait([g.ready() for g in groups], num_returns=len(groups), timeout=placement_timeout_s)
        if len(ready) < len(groups):
            raise RuntimeError(
                f"could not place {spec.num_workers} workers as {spec.groups} group(s) of {spec.workers_per_node} "
                f"x {bundle} on one node each within {placement_timeout_s:g}s; cluster resources: "
                f"{ray.cluster_resources()}. Lower --num-workers / --cpus-per-worker or add nodes.")
        worker_cls = ray.remote(max_restarts=0)(TrainWorker)
        for g_idx, group in enumerate(groups):
            for b in range(spec.workers_per_node):
                strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=b)
                actors.append(worker_cls.options(num_cpus=spec.cpus_per_worker, num_gpus=spec.gpus_per_worker,
                                                 scheduling_strategy=strategy).remote(g_idx, b))
        placements = ray.get([a.placement.remote() for a in actors])
        envs = assign_ranks(placements, master_port=0)
        rank0 = next(i for i, e in enumerate(envs) if e["RANK"] == "0")
        port = ray.get(actors[rank0].free_port.remote())
        for env in envs:
            env["MASTER_PORT"] = str(port)
        nodes = len({p.node_id for p in placements})
        print(f"[ray_launcher] {spec.num_workers} rank(s) on {nodes} node(s), "
              f"{spec.gpus_per_worker} GPU / {spec.cpus_per_worker:g} CPU each; master "
              f"{envs[rank0]['MASTER_ADDR']}:{port}; trainer args: {' '.join(train_argv)}", flush=True)
        t0 = time.monotonic()
        refs = [a.run.remote(env, list(train_argv)) for a, env in zip(actors, envs)]
        try:
            _wait_for_ranks(refs, [int(e["RANK"]) for e in envs], [p.node_ip for p in placements])
        except RankFailed as e:
            print(f"[ray_launcher] error: {e}", file=sys.stderr, flush=True)
            return e.exit_code if e.exit_code != 0 else 1
        print(f"[ray_launcher] all {spec.num_workers} ranks finished in {time.monotonic() - t0:.1f}s", flush=True)
        return 0
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)
        for g in groups:
            remove_placement_group(g)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Run stts_dist.train on a Ray cluster, one actor per rank")
    ap.add_argument("--config", required=True, help="run config (YAML), relative to the job's working dir")
    ap.add_argument("--num-workers", type=int, default=0,
                    help="ranks; 0 = every GPU of the cluster (or every --cpus-per-worker CPUs without GPUs)")
    ap.add_argument("--workers-per-node", type=int, default=0,
                    help="ranks per placement group (STRICT_PACK: one node); 0 = as many as the largest node holds")
    ap.add_argument("--cpus-per-worker", type=float, default=1.0)
    ap.add_argument("--use-gpu", default="auto", choices=("auto", "yes", "no"))
    ap.add_argument("--placement-timeout-s", type=float, default=120.0)
    ap.add_argument("--address", default=None, help="Ray address; default: the job's cluster (RAY_ADDRESS)")
    ap.add_argument("overrides", nargs="*", help="dotted config overrides passed to the trainer")
    return ap.parse_intermixed_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    import ray
    ray.init(address=args.address, logging_level=logging.WARNING)
    try:
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        try:
            spec = resolve_spec(args.num_workers, args.workers_per_node, args.cpus_per_worker, args.use_gpu, nodes)
        except ValueError as e:
            print(f"[ray_launcher] error: {e}", file=sys.stderr)
            return 2
        train_argv = ["--config", args.config, *args.overrides]
        try:
            return launch(spec, train_argv, args.placement_timeout_s)
        except RuntimeError as e:
            print(f"[ray_launcher] error: {e}", file=sys.stderr)
            return 1
    finally:
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
