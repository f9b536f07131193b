#!/usr/bin/env python
"""Submit the sharding job or a training run to a Ray cluster, follow its logs, return its exit code.

    python jobs/submit.py shards --address http://127.0.0.1:8265 [--config jobs/build_shards.yaml] [key=value ...]
    python jobs/submit.py train  --address http://127.0.0.1:8265 [--config jobs/train_7b.yaml] \\
        [--num-workers N] [--cpus-per-worker C] [key=value ...]

The repository is uploaded with the job (Ray ``working_dir``, without .venv, runs, mlruns, data,
logs, .git); the job runs ``python -m data_pipeline.build_shards`` or
``python -m stts_dist.launch.ray_launcher`` there with the given config and overrides. Its logs
are printed as they arrive; the exit code is 0 when the job SUCCEEDED, else the job's exit code.

``--address`` is the Ray dashboard's HTTP address (default: $RAY_API_SERVER_ADDRESS, else
http://127.0.0.1:8265). A cluster with token authentication (Ray's default for local clusters
since 2.59) needs ``RAY_AUTH_MODE=token`` plus the token in ``RAY_AUTH_TOKEN`` or a file named by
``RAY_AUTH_TOKEN_PATH`` (default ~/.ray/auth_token) in this shell.

Paths in the config are resolved on the cluster, inside Ray's temporary copy of the repository:
outputs (train.out_dir, out_dir, sqlite tracking stores) must be absolute paths on storage that
outlives the job; this script warns about relative ones.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = {"shards": "jobs/build_shards.yaml", "train": "jobs/train_7b.yaml"}
# Anchored at the repository root ("data" alone would also drop the stts_dist/data package).
UPLOAD_EXCLUDES = ["/.venv/", "/runs/", "/mlruns/", "/mlruns.db", "/mlartifacts/", "/data/", "/logs/", "/outputs/",
                   "/.git/", "__pycache__/", "*.pyc", "/.pytest_cache/", "/.hypothesis/", "*.egg-info/"]
# Config keys that name outputs or inputs: relative values point into the temporary upload.
PATH_KEYS = {"shards": ["manifest", "out_dir"], "train": ["train.out_dir", "data.path", "tracking.tracking_uri",
                                                          "tracking.artifact_location"]}
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class SubmitError(RuntimeError):
    """A problem the user can fix; the message says how."""


def repo_relative_config(config: str) -> str:
    """The config as a path inside the repository (the job sees the uploaded copy)."""
    path = Path(config)
    full = (path if path.is_absolute() else Path.cwd() / path).resolve()
    if not full.is_file():
        raise SubmitError(f"--config {config} does not exist")
    try:
        return str(full.relative_to(REPO))
    except ValueError:
        raise SubmitError(f"--config {config} is outside the repository {REPO}; it must be uploaded with the job, "
                          "so put it under jobs/") from None


def relative_path_warnings(kind: str, config: str, overrides: Sequence[str]) -> list[str]:
    """Relative output/input paths of the config (after overrides) that would resolve inside the
    job's temporary working directory on the cluster."""
    from omegaconf import OmegaConf

    cfg = OmegaConf.merge(OmegaConf.load(REPO / config),
                          OmegaConf.from_dotlist([o for o in overrides if "=" in o]))
    warnings = []
    for key in PATH_KEYS[kind]:
        value = OmegaConf.select(cfg, key)
        if not value or not isinstance(value, str):
            continue
        path = value[len("sqlite:///"):] if value.startswith("sqlite:///") else value
        if "://" in path or path.startswith("/"):
            continue
        if key == "data.path" and OmegaConf.select(cfg, "data.source") == "digits":
            continue
        if key.startswith("tracking.") and OmegaConf.select(cfg, "tracking.enabled") is False:
            continue
        example = "sqlite:////shared/mlruns.db or http://<mlflow-host>:5000" if value.startswith("sqlite:") \
            else "/shared/..."
        warnings.append(f"{key}={value} is relative: on the cluster it resolves inside Ray's temporary copy of the "
                        f"repository and is lost when the job ends; pass an absolute path on shared storage "
                        f"(e.g. {key}={example})")
    return warnings


# --python auto: the interpreter Ray itself runs with on the node that starts the job. The job's
# shell is a child of Ray's job supervisor, a Python process with that interpreter's
# ray/_raylet.so mapped: <prefix>/lib/pythonX.Y/site-packages/ray/_raylet.so -> <prefix>/bin/python
# (a venv, conda env or system prefix), whatever the head's PATH says. Falls back to python3.
CLUSTER_PYTHON = ('PY=$(sed -n "s#^.* \\(/.*\\)/lib/python[0-9.]*/site-packages/ray/_raylet.so\\$#\\1/bin/python#p" '
                  '/proc/$PPID/maps 2>/dev/null | head -n 1); [ -x "$PY" ] || PY=$(command -v python3 || command -v python)')
# Before the job starts: the packages it imports, named when the cluster's interpreter lacks them.
PREFLIGHT = ("import importlib.util, sys; missing = [m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]; "
             "sys.exit(f'the cluster interpreter {sys.executable} lacks the package(s) {missing}: install the project "
             "there (bash tools/setup.sh) or pass --python PATH to an interpreter that has them') if missing else None")
JOB_PACKAGES = {"shards": ("ray", "av", "webdataset", "omegaconf", "numpy", "tokenizers"),
                "train": ("ray", "torch", "deepspeed", "megatron.core", "omegaconf", "webdataset", "tokenizers")}


def build_entrypoint(args: argparse.Namespace, config: str) -> str:
    if args.kind == "shards":
        # ray_address=auto: join the cluster the job runs on instead of starting a local Ray.
        cmd = ["-m", "data_pipeline.build_shards", "--config", config, "ray_address=auto"]
    else:
        cmd = ["-m", "stts_dist.launch.ray_launcher", "--config", config,
               "--num-workers", str(args.num_workers), "--workers-per-node", str(args.workers_per_node),
               "--cpus-per-worker", str(args.cpus_per_worker), "--use-gpu", args.use_gpu]
    python = '"$PY"' if args.python == "auto" else shlex.quote(args.python)
    check = f"{python} -c {shlex.quote(PREFLIGHT)} {shlex.join(JOB_PACKAGES[args.kind])}"
    run = f"exec {python} {shlex.join(cmd + list(args.overrides))}"
    return f"{CLUSTER_PYTHON}; {check} && {run}" if args.python == "auto" else f"{check} && {run}"


def runtime_env(env_pairs: Sequence[str]) -> dict[str, Any]:
    env_vars = {"PYTHONUNBUFFERED": "1"}
    for pair in env_pairs:
        if "=" not in pair:
            raise SubmitError(f"--env {pair!r} must look like KEY=VALUE")
        key, value = pair.split("=", 1)
        env_vars[key] = value
    return {"working_dir": str(REPO), "excludes": list(UPLOAD_EXCLUDES), "env_vars": env_vars}


def submit(address: str, entrypoint: str, env: dict[str, Any], submission_id: Optional[str]) -> tuple[Any, str]:
    """-> (client, job id). Ray's authentication and connection errors become :class:`SubmitError`."""
    from ray.job_submission import JobSubmissionClient
    try:
        from ray.exceptions import AuthenticationError
    except ImportError:  # Ray without token authentication
        AuthenticationError = ()  # type: ignore[assignment,misc]
    try:
        client = JobSubmissionClient(address)
        return client, client.submit_job(entrypoint=entrypoint, runtime_env=env, submission_id=submission_id)
    except AuthenticationError as e:  # type: ignore[misc]
        raise SubmitError(
            f"the Ray cluster at {address} requires token authentication: export RAY_AUTH_MODE=token and the "
            f"cluster's token as RAY_AUTH_TOKEN=... or RAY_AUTH_TOKEN_PATH=<file> (default ~/.ray/auth_token); "
            f"`ray get-auth-token` on the head prints it. ({str(e).splitlines()[0]})") from None
    except ConnectionError as e:
        raise SubmitError(f"no Ray dashboard answers at {address} ({e}). Start a head with `ray start --head "
                          f"--dashboard-host=127.0.0.1` or pass the right --address") from None


def follow(client: Any, job_id: str, out=sys.stdout) -> int:
    """Print the job's logs until it ends; return 0 if it SUCCEEDED, else its exit code (>= 1)."""

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            out.write(lines)
            out.flush()

    asyncio.run(tail())
    info = client.get_job_info(job_id)
    while str(info.status) not in TERMINAL:  # the log stream can close a moment before the status flips
        time.sleep(0.5)
        info = client.get_job_info(job_id)
    status = str(info.status)
    print(f"[submit] job {job_id} {status}" + (f": {info.message.splitlines()[0]}" if info.message else ""),
          file=sys.stderr, flush=True)
    if status == "SUCCEEDED":
        return 0
    return info.driver_exit_code if info.driver_exit_code else 1


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=("shards", "train"), help="the sharding job or a training run")
    ap.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265"),
                    help="Ray dashboard address (default $RAY_API_SERVER_ADDRESS or http://127.0.0.1:8265)")
    ap.add_argument("--config", default=None, help="config inside the repository (default jobs/build_shards.yaml "
                                                   "or jobs/train_7b.yaml)")
    ap.add_argument("--python", default="auto", help="interpreter on the cluster (default: the one Ray runs with there)")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment of the job (repeat)")
    ap.add_argument("--submission-id", default=None, help="job id (default: Ray picks one)")
    ap.add_argument("--no-wait", action="store_true", help="submit, print the job id and return")
    train = ap.add_argument_group("train (passed to stts_dist.launch.ray_launcher)")
    train.add_argument("--num-workers", type=int, default=0, help="ranks; 0 = every GPU (or CPU slot) of the cluster")
    train.add_argument("--workers-per-node", type=int, default=0)
    train.add_argument("--cpus-per-worker", type=float, default=1.0)
    train.add_argument("--use-gpu", default="auto", choices=("auto", "yes", "no"))
    ap.add_argument("overrides", nargs="*", help="key=value overrides for the job's config")
    return ap.parse_intermixed_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        config = repo_relative_config(args.config or DEFAULT_CONFIGS[args.kind])
        for warning in relative_path_warnings(args.kind, config, args.overrides):
            print(f"[submit] warning: {warning}", file=sys.stderr)
        entrypoint = build_entrypoint(args, config)
        client, job_id = submit(args.address, entrypoint, runtime_env(args.env), args.submission_id)
    except SubmitError as e:
        print(f"[submit] error: {e}", file=sys.stderr)
        return 2
    shown = entrypoint.rsplit("&& exec ", 1)[-1]      # the command, without the interpreter lookup and check
    print(f"[submit] job {job_id} submitted to {args.address}: {shown}", file=sys.stderr, flush=True)
    if args.no_wait:
        print(job_id)
        return 0
    try:
        return follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\n[submit] stopped following; job {job_id} keeps running. Stop it with "
              f"`ray job stop --address {args.address} {job_id}`", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
