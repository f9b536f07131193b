"""Untrusted inputs never run code, and local services listen on loopback only.

- Shards: members other than json/txt/frames (``.pickle``, ``.pyd``) are refused by name before
  any byte is decoded. The loader over a Ray-built shard with a ``.pyd`` member is tested in
  ``tests/e2e/test_data_pipeline.py::test_pickle_member_is_rejected_and_never_executed``; here a
  hand-made shard folder covers ``.pickle`` and ``.pyd`` without Ray.
- Checkpoints: ``state.pt`` and DeepSpeed's files are read with ``torch.load(weights_only=True)``;
  a pickle that would create a file is refused with a CheckpointError and the file never appears,
  even when the attacker also rewrote the manifest's checksums.
- Configs: no OmegaConf resolver beyond OmegaConf's built-ins is registered; values are data:
  ``${oc.env:...}`` stays text (the variable is never read), ``__import__(...)`` is a string, and
  YAML's python tags are refused.
- Project code holds no unsafe deserialisation call (``torch.load`` without ``weights_only=True``,
  ``pickle.load``, ``eval``/``exec``, ``yaml.load`` without a safe loader, ``np.load`` with pickles).
- The local Ray of the sharding job listens on 127.0.0.1 only and keeps token authentication on.
"""
from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[2]


class _TouchOnUnpickle:
    """Unpickling this runs ``Path(target).touch()``: proof that a pickle was executed."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def _live_payload(sentinel: Path) -> bytes:
    payload = pickle.dumps(_TouchOnUnpickle(str(sentinel)))
    control = sentinel.with_name(sentinel.name + ".control")
    pickle.loads(pickle.dumps(_TouchOnUnpickle(str(control))))
    assert control.exists()                      # the payload kind is live: unpickling runs code
    control.unlink()
    return payload


# -- shards --------------------------------------------------------------------------------------

def _write_shard_folder(root: Path, extra_member: tuple[str, bytes] | None) -> Path:
    """A one-sample shard folder in the sharding job's format (``index.json`` + one tar)."""
    root.mkdir(parents=True)
    frame = io.BytesIO()
    np.save(frame, np.full((8, 8, 3), 7, np.uint8), allow_pickle=False)
    record = {"id": "a", "task": "t", "question": "q", "answer": "x", "fps": 1.0, "turns": [], "timestamps": [0.0],
              "native_fps": 1.0, "original_size": [8, 8], "source": "a.mp4", "meta": {}}
    members = [("k0.json", json.dumps(record).encode()), ("k0.000.npy", frame.getvalue())]
    if extra_member is not None:
        members.insert(1, extra_member)
    shard = root / "shard-000000.tar"
    with tarfile.open(shard, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    row = {"shard": shard.name, "key": "k0", "id": "a", "task": "t", "frames": 1, "patches_per_frame": 1,
           "groups_per_frame": 1, "llm_visual_tokens": 1, "text_tokens": 1, "is_video": False}
    (root / "index.json").write_text(json.dumps({
        "version": 1, "plan_hash": "h", "config": {}, "num_samples": 1, "num_shards": 1, "num_skipped": 0,
        "shards": [{"name": shard.name, "samples": 1, "bytes": shard.stat().st_size}], "samples": [row]}))
    return root


@pytest.mark.parametrize("member", ["k0.pickle", "k0.pyd"])
@pytest.mark.parametrize("workers", [0, 1])
def test_loader_refuses_pickled_shard_members_without_running_them(tmp_path, member, workers):
    from data_pipeline.errors import UnsafeMemberError
    from data_pipeline.loader import VideoLoader

    def load(folder: Path) -> list:
        return list(VideoLoader({"datasets": [{"path": str(folder)}], "num_workers": workers, "shuffle_window": 0}))

    good = load(_write_shard_folder(tmp_path / "good", None))
    assert [s["id"] for s in good] == ["a"] and good[0]["frames"].shape == (1, 8, 8, 3)   # the format is right

    sentinel = tmp_path / "pwned"
    folder = _write_shard_folder(tmp_path / "bad", (member, _live_payload(sentinel)))
    with pytest.raises(UnsafeMemberError, match=rf"shard .*shard-000000\.tar: member '{member}' is not a type"):
        load(folder)
    assert not sentinel.exists()


# -- checkpoints ---------------------------------------------------------------------------------

def _malicious_torch_file(path: Path, sentinel: Path, wrap=lambda x: x) -> None:
    torch.save(wrap(_TouchOnUnpickle(str(sentinel))), path)
    control = sentinel.with_name("control")
    torch.save(_TouchOnUnpickle(str(control)), path.with_name("control.pt"))
    torch.load(path.with_name("control.pt"), weights_only=False)
    assert control.exists()                       # torch.load without weights_only would run it
    path.with_name("control.pt").unlink()


def _reseal_manifest(ckpt_dir: Path) -> None:
    """What an attacker who can write the folder also does: make the checksums match again."""
    mf = ckpt_dir / "manifest.json"
    manifest = json.loads(mf.read_text())
    for name in manifest["files"]:
        data = (ckpt_dir / name).read_bytes()
        manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    mf.write_text(json.dumps(manifest))


def test_load_torch_refuses_a_pickled_object(tmp_path):
    from stts_dist.checkpoint import CheckpointError, load_torch

    sentinel = tmp_path / "pwned"
    _malicious_torch_file(tmp_path / "state.pt", sentinel, wrap=lambda x: {"model": {}, "step": x})
    with pytest.raises(CheckpointError, match=r"cannot load .*state\.pt safely \(weights_only=True\)"):
        load_torch(tmp_path / "state.pt")
    assert not sentinel.exists()


def _cfg(out_dir: Path, *extra: str):
    from stts_dist.config import load_config
    return load_config(None, tiny_overrides(**{"train.out_dir": str(out_dir), "train.steps": 2,
                                               "train.eval_prune_ratios": "[0.5]", "data.eval_samples": 2})
                       + list(extra))


def test_resume_refuses_a_malicious_state_file_with_a_matching_manifest(tmp_path):
    from stts_dist.checkpoint import CheckpointError
    from stts_dist.train.trainer import Trainer

    Trainer(_cfg(tmp_path / "run")).fit()
    step = tmp_path / "run" / "checkpoints" / "step_00000002"
    sentinel = tmp_path / "pwned"
    _malicious_torch_file(step / "state.pt", sentinel, wrap=lambda x: {"model": x})
    _reseal_manifest(step)
    with pytest.raises(CheckpointError, match=r"step_00000002/state\.pt safely \(weights_only=True\)"):
        Trainer(_cfg(tmp_path / "run", "train.steps=4")).fit()
    assert not sentinel.exists()


def _deepspeed_train_body(rank, world, overrides):
    from stts_dist.config import load_config
    from stts_dist.train.trainer import Trainer
    Trainer(load_config(None, overrides), callbacks=[]).fit()
    return True


def _deepspeed_resume_body(rank, world, overrides, tampered, sentinel):
    """Resume from the tampered checkpoint; then, as a control, read the same file the way
    DeepSpeed's stock TorchCheckpointEngine does."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from stts_dist.config import load_config
    from stts_dist.checkpoint import CheckpointError
    from stts_dist.train.trainer import Trainer
    try:
        Trainer(load_config(None, overrides), callbacks=[]).fit()
        error = ""
    except CheckpointError as e:
        error = str(e)
    ran_on_resume = Path(sentinel).exists()
    TorchCheckpointEngine().load(tampered, map_location="cpu")
    return {"error": error, "ran_on_resume": ran_on_resume, "ran_with_stock_deepspeed": Path(sentinel).exists()}


@pytest.mark.slow
def test_deepspeed_resume_refuses_a_malicious_optimizer_file(tmp_path):
    from dist_utils import run_distributed

    out = tmp_path / "run"
    ds = ["parallel.engine=deepspeed", "parallel.timeout_s=30"]
    run_distributed(_deepspeed_train_body, 1, [str(x) for x in _cfg_overrides(out, ds)])
    step = out / "checkpoints" / "step_00000002"
    tampered = step / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    assert tampered.is_file()
    sentinel = tmp_path / "pwned"
    torch.save({"optimizer_state_dict": _TouchOnUnpickle(str(sentinel))}, tampered)
    _reseal_manifest(step)
    [result] = run_distributed(_deepspeed_resume_body, 1, _cfg_overrides(out, ds + ["train.steps=4"]),
                               str(tampered), str(sentinel))
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt safely (weights_only=True)" in result["error"]
    assert not result["ran_on_resume"]
    assert result["ran_with_stock_deepspeed"]      # the control: DeepSpeed alone would have run it


def _cfg_overrides(out_dir: Path, extra: list[str]) -> list[str]:
    return tiny_overrides(**{"train.out_dir": str(out_dir), "train.steps": 2, "train.eval_prune_ratios": "[0.5]",
                             "data.eval_samples": 2}) + extra


# -- configs -------------------------------------------------------------------------------------

OMEGACONF_BUILTIN_RESOLVERS = {"oc.create", "oc.decode", "oc.deprecated", "oc.env", "oc.select", "oc.dict.keys",
                               "oc.dict.values"}


def _project_sources() -> list[Path]:
    folders = ("stts_dist", "data_pipeline", "tools", "jobs")
    return sorted(p for folder in folders for p in (REPO / folder).rglob("*.py"))


def test_no_config_resolver_is_registered():
    from omegaconf.basecontainer import BaseContainer

    import data_pipeline.config  # noqa: F401  (everything that loads configs)
    import stts_dist.config  # noqa: F401
    import stts_dist.train.trainer  # noqa: F401
    assert set(BaseContainer._resolvers) <= OMEGACONF_BUILTIN_RESOLVERS
    for path in _project_sources():
        text = path.read_text()
        assert "register_new_resolver" not in text and "legacy_register_resolver" not in text, path


def test_config_values_are_data_never_resolved_or_evaluated(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from stts_dist.config import ConfigError, flatten, load_config, to_yaml

    monkeypatch.setenv("STTS_TEST_SECRET", "hunter2")
    sentinel = tmp_path / "pwned"
    code = f"__import__('os').system('touch {sentinel}')"
    p = tmp_path / "job.yaml"
    p.write_text(f"name: \"{code}\"\ntracking:\n  run_name: ${{oc.env:STTS_TEST_SECRET}}\n"
                 "optim:\n  freeze: [vit, '${oc.env:STTS_TEST_SECRET}']\n")
    cfg = load_config(p, ["tracking.experiment=${oc.env:STTS_TEST_SECRET}"])
    assert cfg.name == code and not sentinel.exists()
    assert cfg.tracking.run_name == "${oc.env:STTS_TEST_SECRET}" == cfg.tracking.experiment
    assert list(cfg.optim.freeze) == ["vit", "${oc.env:STTS_TEST_SECRET}"]
    everything = json.dumps(OmegaConf.to_container(cfg, resolve=True)) + to_yaml(cfg) + json.dumps(flatten(cfg))
    assert "hunter2" not in everything            # the variable was never read
    reloaded = tmp_path / "saved.yaml"            # checkpoints store to_yaml(cfg) and load it again
    reloaded.write_text(to_yaml(cfg))
    assert load_config(reloaded).tracking.run_name == "${oc.env:STTS_TEST_SECRET}"
    # a validated field names the literal text, never the resolved value
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.tasks=[count,'${oc.env:STTS_TEST_SECRET}']"])
    assert "${oc.env:STTS_TEST_SECRET}" in str(err.value) and "hunter2" not in str(err.value)


@pytest.mark.parametrize("text, match", [
    ("train:\n  steps: ${oc.env:STTS_TEST_SECRET}\n", r"wrong type for config key 'train.steps'.*interpolation"),
    ("model: ${oc.env:STTS_TEST_SECRET}\n", r"not a subclass of ModelConfig"),
    ("data:\n  tasks: [count, '???']\n", r"config key 'data.tasks\[1\]' has no value"),
    ("name: !!python/object/apply:os.system ['touch {sentinel}']\n", r"not valid YAML"),
])
def test_config_tricks_are_clear_errors(tmp_path, text, match):
    from stts_dist.config import ConfigError, load_config

    sentinel = tmp_path / "pwned"
    p = tmp_path / "job.yaml"
    p.write_text(text.replace("{sentinel}", str(sentinel)))
    with pytest.raises(ConfigError, match=match):
        load_config(p)
    assert not sentinel.exists()


# -- project code --------------------------------------------------------------------------------

def _unsafe_calls(tree: ast.AST) -> list[str]:
    """Calls that can execute code from data, by name (see the module docstring)."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.id if isinstance(f, ast.Name) else (
            f"{f.value.id}.{f.attr}" if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else "")
        kw = {k.arg: k.value for k in node.keywords}

        def const(key):
            return getattr(kw.get(key), "value", None)
        if name == "torch.load" and const("weights_only") is not True:
            found.append(f"line {node.lineno}: torch.load without weights_only=True")
        elif name in ("pickle.load", "pickle.loads", "cloudpickle.load", "cloudpickle.loads", "dill.load",
                      "dill.loads", "marshal.loads", "shelve.open", "joblib.load", "yaml.unsafe_load",
                      "yaml.full_load", "eval", "exec"):
            found.append(f"line {node.lineno}: {name}")
        elif name == "yaml.load":
            loader = kw.get("Loader") or (node.args[1] if len(node.args) > 1 else ast.Constant(""))
            if "Safe" not in ast.unparse(loader):
                found.append(f"line {node.lineno}: yaml.load without a SafeLoader")
        elif name in ("np.load", "numpy.load") and const("allow_pickle") is True:
            found.append(f"line {node.lineno}: np.load(allow_pickle=True)")
    return found


def test_project_code_has_no_unsafe_deserialisation_calls():
    problems = {str(p.relative_to(REPO)): calls for p in _project_sources()
                if (calls := _unsafe_calls(ast.parse(p.read_text(), str(p))))}
    assert problems == {}
    # the scanner itself sees what it is looking for
    assert len(_unsafe_calls(ast.parse("torch.load(p)\npickle.loads(b)\neval(s)\nyaml.load(s)\n"
                                       "yaml.load(s, Loader=yaml.SafeLoader)\ntorch.load(p, weights_only=True)\n"
                                       "np.load(f, allow_pickle=True)\nm.eval()\n"))) == 5


# -- services ------------------------------------------------------------------------------------

RAY_PROBE = r"""
import ipaddress, json, os, psutil
from data_pipeline.ray_session import start_local_ray
start_local_ray(1)
import ray
from ray._raylet import AuthenticationMode, get_authentication_mode

@ray.remote
def pid():
    return os.getpid()

worker = ray.get(pid.remote())
me = psutil.Process()
procs = [me] + me.children(recursive=True)
sockets = []
for p in procs:
    for c in p.net_connections(kind="inet"):
        if c.status in (psutil.CONN_LISTEN, psutil.CONN_NONE):
            ip = ipaddress.ip_address(c.laddr.ip)
            ip = getattr(ip, "ipv4_mapped", None) or ip
            sockets.append({"process": p.name(), "ip": c.laddr.ip, "port": c.laddr.port, "loopback": ip.is_loopback})
print(json.dumps({"sockets": sockets, "processes": sorted({p.name() for p in procs}),
                  "worker_seen": any(p.pid == worker for p in procs),
                  "token_auth": get_authentication_mode() == AuthenticationMode.TOKEN,
                  "nodes": [n["NodeManagerAddress"] for n in ray.nodes()]}))
ray.shutdown()
"""


@pytest.mark.slow
def test_local_ray_listens_on_loopback_only_with_token_auth(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    done = subprocess.run([sys.executable, "-c", RAY_PROBE], cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["worker_seen"] and {"gcs_server", "raylet"} <= set(report["processes"])
    listening = report["sockets"]
    assert len({s["process"] for s in listening}) >= 3            # GCS, raylet, workers and agents listen ...
    assert [s for s in listening if not s["loopback"]] == []      # ... on loopback only
    assert report["nodes"] == ["127.0.0.1"]
    assert report["token_auth"]
