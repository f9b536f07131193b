"""Fault drills: real failures injected into real 2-rank torchrun jobs on this machine.

    .venv/bin/python tools/fault_drill.py [--work DIR] [--only kill_rank,sigterm,...] [--keep]

Every drill starts from a fresh output folder and trains ``jobs/tiny_dist.yaml`` on 2 CPU ranks
(gloo, DeepSpeed ZeRO-3) with ``tracking.enabled=false parallel.timeout_s=20``:

- ``kill_rank``             SIGKILL rank 1 in the middle of step 6: every rank must be gone
                            within 60 s, torchrun must exit non-zero and name rank 1. Then one
                            file of the newest checkpoint is corrupted (``corrupt_checkpoint``):
                            the restart must report it by name and resume from the one before.
- ``sigterm``               SIGTERM to torchrun (Slurm preemption): a checkpoint of the step the
                            ranks agreed to stop at is written before exit; the restart resumes
                            from it.
- ``kill_during_checkpoint`` SIGKILL the whole job (torchrun and each rank: torchrun starts every
                            rank in a session of its own) while ``step_X.tmp`` exists: the restart
                            must use the previous complete checkpoint.
- ``corrupt_shard`` / ``bad_manifest`` / ``unknown_config_key``: bad inputs to the training CLI
                            must fail with a message naming the shard / line and key / key.

Every restart runs to the end, and the samples each rank trained on (``STTS_SAMPLE_LOG``, see
``stts_dist/faults.py``) are compared step by step with an uninterrupted run: none lost, none
repeated. The last line printed is one JSON object: ``drills``, ``passed``, ``samples_lost``,
``samples_repeated``, ``max_exit_s`` and per-drill details.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from stts_dist.faults import SAMPLE_LOG_ENV, compare_timelines, surviving_timeline  # noqa: E402

CONFIG = "jobs/tiny_dist.yaml"
STEPS = 8
COLLECTIVE_TIMEOUT_S = 20.0
RUN_TIMEOUT_S = 300.0
COMMON = ["tracking.enabled=false", f"parallel.timeout_s={COLLECTIVE_TIMEOUT_S:.0f}", f"train.steps={STEPS}",
          "train.log_every=1"]
EXIT_CHECK = "all ranks and torchrun exit within the allowance (collective timeout + the job's start-up)"
PROCESS_DRILLS = ("kill_rank", "sigterm", "kill_during_checkpoint")
INPUT_DRILLS = ("corrupt_shard", "bad_manifest", "unknown_config_key")
ALL_DRILLS = PROCESS_DRILLS + ("corrupt_checkpoint",) + INPUT_DRILLS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(sample_log: Optional[Path] = None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    env.pop(SAMPLE_LOG_ENV, None)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)     # a drill started from inside a launcher must not inherit its rank
    if sample_log is not None:
        env[SAMPLE_LOG_ENV] = str(sample_log)
    return env


# ---------------------------------------------------------------------------------------------
# one torchrun job

class Job:
    """``torchrun --nproc_per_node 2 -m stts_dist.train`` in its own session (process group)."""

    def __init__(self, out_dir: Path, sample_log: Path, log: Path, overrides: list[str]):
        self.out_dir, self.sample_log, self.log = out_dir, sample_log, log
        torchrun = Path(sys.executable).with_name("torchrun")
        launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
        self.cmd = launcher + ["--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                               str(_free_port()), "-m", "stts_dist.train", "--config", CONFIG, *COMMON,
                               f"train.out_dir={out_dir}", *overrides]
        self.launched = time.monotonic()
        with open(log, "ab") as f:
            self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=_env(sample_log), stdout=f, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        self._ranks: dict[int, psutil.Process] = {}
        self.startup_s: Optional[float] = None

    def wait_first_step(self) -> float:
        """Seconds from launch until rank 0 logged its first step: this machine's start-up time
        for this job right now (a loaded machine's is longer), the scale of the exit allowance."""
        wait_for(lambda: logged_step(self.sample_log, 0) >= 1 or self.proc.poll() is not None, RUN_TIMEOUT_S,
                 "rank 0 to finish step 1")
        self.startup_s = time.monotonic() - self.launched
        return self.startup_s

    def exit_allowance_s(self) -> float:
        """How long all processes may take to be gone after a fault: the collective timeout (a
        survivor blocked in a collective with a dead peer gives up after it) plus the job's own
        measured start-up, for tearing down what start-up built (derived, not fixed: it grows with
        the machine's load)."""
        if self.startup_s is None:
            raise RuntimeError("call wait_first_step() before asking for the exit allowance")
        return COLLECTIVE_TIMEOUT_S + self.startup_s

    def rank_processes(self, timeout: float = 120.0) -> dict[int, psutil.Process]:
        """Global rank -> process, read from the workers' environment (waits until both exist)."""
        deadline = time.monotonic() + timeout
        while len(self._ranks) < 2 and time.monotonic() < deadline and self.proc.poll() is None:
            try:
                for child in psutil.Process(self.proc.pid).children():
                    rank = child.environ().get("RANK")
                    if rank is not None:
                        self._ranks[int(rank)] = child
            except psutil.Error:
                pass
            time.sleep(0.05)
        return dict(self._ranks)

    def wait(self, timeout: float = RUN_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"torchrun job in {self.out_dir} still running after {timeout:.0f} s; killed "
                               f"(log: {self.log})") from None

    def seconds_until_all_gone(self, since: float) -> float:
        """Seconds from ``since`` until torchrun and every rank have exited (kills them at twice
        :meth:`exit_allowance_s`, reporting infinity)."""
        procs = list(self._ranks.values())
        deadline = since + 2 * self.exit_allowance_s()
        while time.monotonic() < deadline:
            alive = self.proc.poll() is None or any(_running(p) for p in procs)
            if not alive:
                return time.monotonic() - since
            time.sleep(0.05)
        self.kill()
        return float("inf")

    def kill(self) -> None:
        """SIGKILL torchrun and every rank at once. torchrun starts each rank in a session of its
        own, so killing torchrun's process group alone leaves the ranks running (as orphans)."""
        procs = [psutil.Process(self.proc.pid)] if self.proc.poll() is None else []
        for p in list(procs) + list(self._ranks.values()):
            try:
                procs.extend(p.children(recursive=True))
            except psutil.Error:
                pass
        for p in procs + list(self._ranks.values()):
            try:
                p.kill()
            except psutil.Error:
                pass
        self.proc.wait()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, poll: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def logged_step(sample_log: Path, rank: int) -> int:
    """The last step ``rank`` logged in ``sample_log`` (0 if none)."""
    if not sample_log.is_file():
        return 0
    last = 0
    for line in sample_log.read_text().splitlines():
        parts = line.split("\t")
        if parts[0] == "step" and len(parts) == 5 and parts[1] == str(rank):
            last = int(parts[3])
    return last


# ---------------------------------------------------------------------------------------------
# results

@dataclass
class DrillResult:
    name: str
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    exit_s: Optional[float] = None
    samples_lost: int = 0
    samples_repeated: int = 0
    seconds: float = 0.0
    error: str = ""
    exit_codes: dict[str, int] = field(default_factory=dict)   # launcher / CLI exit codes, by phase
    info: dict = field(default_factory=dict)                    # what the drill observed (steps, files)

    def check(self, what: str, ok: bool, detail: str = "") -> bool:
        self.checks.append((what, bool(ok), detail))
        return bool(ok)

    def check_exit(self, job: "Job") -> bool:
        """``exit_s`` (set by the drill) against the job's derived exit allowance."""
        allowance = self.info["exit_allowance_s"] = round(job.exit_allowance_s(), 2)
        self.info["startup_s"] = round(job.startup_s, 2)
        return self.check(EXIT_CHECK, self.exit_s <= allowance,
                          f"{self.exit_s:.1f} s after the fault; allowance {allowance:.1f} s = collective timeout "
                          f"{COLLECTIVE_TIMEOUT_S:.0f} s + start-up {job.startup_s:.1f} s")

    @property
    def passed(self) -> bool:
        return not self.error and bool(self.checks) and all(ok for _, ok, _ in self.checks)

    def to_dict(self) -> dict:
        exit_s = None if self.exit_s is None else round(self.exit_s, 2)
        return {"name": self.name, "passed": self.passed, "exit_s": exit_s,
                "samples_lost": self.samples_lost, "samples_repeated": self.samples_repeated,
                "seconds": round(self.seconds, 1), "error": self.error, "exit_codes": self.exit_codes,
                "info": self.info,
                "failed_checks": [f"{w}: {d}" for w, ok, d in self.checks if not ok],
                "checks": [w for w, _, _ in self.checks]}


def _tail(text: str, n: int = 600) -> str:
    return text[-n:].replace("\n", " | ")


class Drills:
    def __init__(self, work: Path):
        self.work = work
        self.baseline = None

    def folder(self, name: str) -> Path:
        d = self.work / name
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        return d

    def job(self, d: Path, *overrides: str) -> Job:
        return Job(d / "run", d / "samples.tsv", d / "train.log", list(overrides))

    def compare_samples(self, r: DrillResult, d: Path) -> None:
        if self.baseline is None:
            self.baseline = self.uninterrupted()
        timeline, _ = surviving_timeline(d / "samples.tsv")
        cmp = compare_timelines(timeline, self.baseline)
        r.samples_lost, r.samples_repeated = cmp.lost, cmp.repeated
        r.check("the surviving timeline equals the uninterrupted run step by step (none lost, none repeated)",
                cmp.identical, f"lost={cmp.lost} repeated={cmp.repeated} mismatched={cmp.mismatched_steps} "
                               f"missing={cmp.missing_steps}")

    def uninterrupted(self):
        d = self.folder("uninterrupted")
        job = self.job(d, "train.save_every=2")
        rc = job.wait()
        if rc != 0:
            raise RuntimeError(f"the uninterrupted reference run failed (exit {rc}): {_tail(job.output())}")
        timeline, _ = surviving_timeline(d / "samples.tsv")
        if sorted(timeline) != [0, 1] or any(sorted(s) != list(range(1, STEPS + 1)) for s in timeline.values()):
            raise RuntimeError(f"the reference run logged steps {({r: sorted(s) for r, s in timeline.items()})}")
        return timeline

    # -- process faults --------------------------------------------------------------------
    def kill_rank(self) -> list[DrillResult]:
        """SIGKILL rank 1 during step 6 (checkpoints at 2 and 4); corrupt the newest; restart."""
        r, corrupt = DrillResult("kill_rank"), DrillResult("corrupt_checkpoint")
        d = self.folder("kill_rank")
        job = self.job(d, "train.save_every=2")
        ranks = job.rank_processes()
        job.wait_first_step()
        wait_for(lambda: logged_step(job.sample_log, 1) >= 5 or job.proc.poll() is not None, RUN_TIMEOUT_S,
                 "rank 1 to finish step 5")
        victim = ranks[1]        # now between "step 5 done" and "step 6 done": inside step 6
        killed_at = time.monotonic()
        victim.send_signal(signal.SIGKILL)
        r.exit_s = job.seconds_until_all_gone(killed_at)
        rc = r.exit_codes["torchrun after the kill"] = job.proc.wait()
        out = job.output()
        r.check_exit(job)
        r.check("torchrun exits non-zero", rc != 0, f"exit code {rc}")
        r.check("rank 1 was killed inside step 6", logged_step(job.sample_log, 1) == 5,
                f"rank 1 last logged step {logged_step(job.sample_log, 1)}")
        root_cause = out.rsplit("Root Cause (first observed failure):", 1)[-1]
        r.check("torchrun names the killed rank as the root cause (rank 1, SIGKILL)",
                "rank      : 1 (local_rank: 1)" in root_cause
                and f"Signal 9 (SIGKILL) received by PID {victim.pid}" in root_cause, _tail(out))
        # corrupt one file of the newest complete checkpoint: the restart must fall back
        from stts_dist import checkpoint as ckpt
        root = job.out_dir / "checkpoints"
        complete = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        corrupt.check("two complete checkpoints before the restart", len(complete) >= 2,
                      str([p.name for p in complete]))
        newest, previous = complete[-1], complete[-2]
        corrupt.info.update(newest=newest.name, previous=previous.name)
        files = ckpt.verify(newest)["files"]
        victim_file = max(files, key=lambda name: files[name]["size"])   # a weights/optimizer file
        path = newest / victim_file
        corrupt.info["corrupted_file"] = victim_file
        blob = bytearray(path.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        path.write_bytes(bytes(blob))
        again = self.job(d, "train.save_every=2")
        rc2 = r.exit_codes["restart"] = again.wait()
        out2 = again.output()[len(out):]
        r.check("the restart finishes", rc2 == 0, f"exit code {rc2}: {_tail(out2)}")
        corrupt.check("the restart names the corrupt checkpoint and file",
                      f"skipping checkpoint {newest}: file {victim_file} fails its checksum" in out2, _tail(out2))
        corrupt.check("the restart resumes from the previous complete checkpoint",
                      f"[resume] from {previous} at step {int(previous.name[5:])}" in out2, _tail(out2))
        self.compare_samples(r, d)
        corrupt.samples_lost, corrupt.samples_repeated = r.samples_lost, r.samples_repeated
        return [r, corrupt]

    def sigterm(self) -> list[DrillResult]:
        """SIGTERM to torchrun after step 3 (no periodic checkpoints): the stop checkpoint is
        the only one, and the restart resumes from it."""
        r = DrillResult("sigterm")
        d = self.folder("sigterm")
        job = self.job(d, "train.save_every=0")
        job.rank_processes()
        job.wait_first_step()
        wait_for(lambda: logged_step(job.sample_log, 0) >= 3 or job.proc.poll() is not None, RUN_TIMEOUT_S,
                 "rank 0 to finish step 3")
        sent = time.monotonic()
        job.proc.send_signal(signal.SIGTERM)
        r.exit_s = job.seconds_until_all_gone(sent)
        rc = r.exit_codes["torchrun after SIGTERM"] = job.proc.wait()
        out = job.output()
        r.check_exit(job)
        from stts_dist import checkpoint as ckpt
        root = job.out_dir / "checkpoints"
        found = ckpt.find_resumable(root, lambda m: None)
        stop_lines = [line for line in out.splitlines()
                      if line.startswith("[signal] SIGTERM received: checkpointing at step ")]
        if not r.check("rank 0 reports the SIGTERM and the step it checkpoints", len(stop_lines) == 1, _tail(out)):
            return [r]
        stop_step = r.info["stop_step"] = int(stop_lines[0].rsplit(" ", 1)[1])
        r.check("a verified checkpoint of that step was written before exit",
                found is not None and found[1]["step"] == stop_step and 3 <= stop_step < STEPS,
                f"found {found and found[0]}, stop step {stop_step}")
        preempted = out.count("checkpoint written, resume by starting the same command again")  # cli.py, then 143
        r.check("both ranks leave through the preemption exit (code 143)", preempted == 2, _tail(out))
        again = self.job(d, "train.save_every=0")
        rc2 = r.exit_codes["restart"] = again.wait()
        out2 = again.output()[len(out):]
        r.check("the restart resumes from the SIGTERM checkpoint and finishes",
                rc2 == 0 and f"[resume] from {root / f'step_{stop_step:08d}'} at step {stop_step}" in out2,
                f"exit {rc2}: {_tail(out2)}")
        r.check("torchrun's own exit code after SIGTERM is non-zero", rc != 0, f"exit code {rc}")
        self.compare_samples(r, d)
        return [r]

    def kill_during_checkpoint(self, attempts: int = 3) -> list[DrillResult]:
        """SIGKILL the job the moment ``step_X.tmp`` (X >= 2) appears; checkpoints every step."""
        r = DrillResult("kill_during_checkpoint")
        for attempt in range(1, attempts + 1):
            d = self.folder("kill_during_checkpoint")
            job = self.job(d, "train.save_every=1")
            job.rank_processes()
            job.wait_first_step()
            root = job.out_dir / "checkpoints"
            tmp: list[Path] = []

            def partial() -> bool:
                if root.is_dir():
                    tmp[:] = [p for p in root.glob("step_*.tmp") if int(p.name[5:13]) >= 2]
                return bool(tmp) or job.proc.poll() is not None
            wait_for(partial, RUN_TIMEOUT_S, "a checkpoint being written", poll=0.002)
            killed_at = time.monotonic()
            job.kill()
            r.exit_s = job.seconds_until_all_gone(killed_at)
            job.proc.wait()
            if not tmp:
                raise RuntimeError(f"the job ended before writing a second checkpoint: {_tail(job.output())}")
            writing = tmp[0]
            final = writing.with_name(writing.name[:-4])
            if writing.is_dir() and not final.exists():
                break
            print(f"[drill] attempt {attempt}: {writing.name} was renamed before the kill landed; again", flush=True)
        else:
            r.check(f"hit a checkpoint write within {attempts} attempts", False, "")
            return [r]
        out = job.output()
        step = int(final.name[5:])
        r.info["killed_while_writing"] = writing.name
        written = sorted(str(p.relative_to(writing)) for p in writing.rglob("*") if p.is_file())
        r.info["files_in_tmp"] = written
        r.check("the killed write left only a .tmp folder, without its manifest",
                writing.is_dir() and not final.exists() and "manifest.json" not in written,
                f"{writing.name}: {written}")
        r.check_exit(job)
        again = self.job(d, "train.save_every=1")
        rc2 = r.exit_codes["restart"] = again.wait()
        out2 = again.output()[len(out):]
        previous = root / f"step_{step - 1:08d}"
        r.check("the restart resumes from the previous complete checkpoint and finishes",
                rc2 == 0 and f"[resume] from {previous} at step {step - 1}" in out2, f"exit {rc2}: {_tail(out2)}")
        r.check("no .tmp folder is left after the restart", not list(root.glob("*.tmp")), str(list(root.glob("*.tmp"))))
        self.compare_samples(r, d)
        return [r]

    # -- bad inputs (one process, no torchrun) ---------------------------------------------
    def _train_cli(self, d: Path, *args: str, timeout: float = RUN_TIMEOUT_S) -> tuple[int, str]:
        cmd = [sys.executable, "-m", "stts_dist.train", *args]
        done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
        (d / "train.log").write_text(done.stdout + done.stderr)
        return done.returncode, done.stdout + done.stderr

    def unknown_config_key(self) -> list[DrillResult]:
        r = DrillResult("unknown_config_key")
        d = self.folder("unknown_config_key")
        cfg = d / "typo.yaml"
        cfg.write_text((REPO / CONFIG).read_text().replace("  steps: 4", "  stpes: 4"))
        rc, out = self._train_cli(d, "--config", str(cfg), "tracking.enabled=false", f"train.out_dir={d / 'run'}")
        r.exit_codes["cli"] = rc
        r.check("exit code 2", rc == 2, f"exit {rc}")
        r.check("the message names the file, the key and the closest valid key",
                f"error: {cfg}: unknown config key 'train.stpes'. Did you mean 'train.steps'?" in out, _tail(out))
        r.check("no training started", not (d / "run").exists(), "")
        return [r]

    def bad_manifest(self) -> list[DrillResult]:
        r = DrillResult("bad_manifest")
        d = self.folder("bad_manifest")
        manifest = d / "manifest.jsonl"
        manifest.write_text(json.dumps({"video": "a.mp4", "question": "how many?", "answer": "3"}) + "\n" +
                            json.dumps({"video": "b.mp4", "question": "how many?", "answer": 3, "start": "0"}) + "\n")
        rc, out = self._train_cli(d, "--config", CONFIG, "tracking.enabled=false", "data.source=manifest",
                                  f"data.path={manifest}", f"data.work_dir={d / 'work'}", f"train.out_dir={d / 'run'}")
        r.exit_codes["cli"] = rc
        r.check("non-zero exit", rc != 0, f"exit {rc}")
        r.check("the message names the manifest, the line, the key and the expected type",
                f"ManifestError: {manifest} line 2: key 'answer' must be a string, got integer 3" in out, _tail(out))
        r.check("nothing was sharded", not (d / "work" / "shards" / "index.json").exists(), "")
        return [r]

    def corrupt_shard(self) -> list[DrillResult]:
        """Shard 8 real mp4 clips with the sharding CLI, truncate one shard, train on the folder."""
        r = DrillResult("corrupt_shard")
        d = self.folder("corrupt_shard")
        env = _env()
        subprocess.run([sys.executable, "-m", "data_pipeline.synth_digits", "--out", str(d / "videos"), "--num", "8",
                        "--frames", "4", "--image-size", "32", "--seed", "0"], cwd=REPO, env=env, check=True,
                       capture_output=True, timeout=RUN_TIMEOUT_S)
        shards = d / "shards"
        subprocess.run([sys.executable, "-m", "data_pipeline.build_shards", "--config", "jobs/build_shards.yaml",
                        f"manifest={d / 'videos' / 'manifest.jsonl'}", f"out_dir={shards}", "image_size=32",
                        "pool_size=2", "max_frames=4", "num_cpus=1", "samples_per_shard=4", "progress_bar=false"],
                       cwd=REPO, env=env, check=True, capture_output=True, timeout=RUN_TIMEOUT_S)
        victim = shards / "shard-000001.tar"
        with open(victim, "r+b") as f:
            f.truncate(victim.stat().st_size // 2)
        rc, out = self._train_cli(d, "--config", CONFIG, "tracking.enabled=false", "data.source=shards",
                                  f"data.path={shards}", "train.steps=2", "train.save_every=0",
                                  f"train.out_dir={d / 'run'}")
        r.exit_codes["cli"] = rc
        r.check("non-zero exit", rc != 0, f"exit {rc}")
        errors = [line for line in out.splitlines()
                  if line.startswith(f"data_pipeline.errors.ShardFormatError: shard {victim} ")]
        r.check("the message names the shard and says it is truncated", bool(errors) and "truncated" in errors[-1],
                _tail(out))
        r.check("no checkpoint was written from the bad data", not (d / "run" / "checkpoints").exists(), "")
        return [r]


def _timed(fn: Callable[[], list[DrillResult]], name: str) -> list[DrillResult]:
    started = time.monotonic()
    try:
        results = fn()
    except Exception as e:   # a drill that cannot even run is a failed drill, reported as such
        results = [DrillResult(name, error=f"{type(e).__name__}: {e}")]
    for res in results:
        res.seconds = time.monotonic() - started
    return results


def run_drills(work: Path, only: Optional[list[str]] = None) -> dict:
    """Run the drills (process drills one after another, the light bad-input drills alongside in a
    thread: they mostly wait on process start-up), return the summary."""
    wanted = list(only or ALL_DRILLS)
    unknown = sorted(set(wanted) - set(ALL_DRILLS))
    if unknown:
        raise SystemExit(f"unknown drill(s) {unknown}; choose from {', '.join(ALL_DRILLS)}")
    drills = Drills(work)
    started = time.monotonic()
    inputs: list[DrillResult] = []

    def input_drills() -> None:
        for name in INPUT_DRILLS:
            if name in wanted:
                inputs.extend(_timed(getattr(drills, name), name))
    side = threading.Thread(target=input_drills, daemon=True)
    side.start()
    results: list[DrillResult] = []
    for name in PROCESS_DRILLS:
        if name in wanted or (name == "kill_rank" and "corrupt_checkpoint" in wanted):
            out = _timed(getattr(drills, name), name)
            results.extend(x for x in out if x.name in wanted)
            print("[drill] " + ", ".join(f"{x.name}: {'passed' if x.passed else 'FAILED'}" for x in out), flush=True)
    side.join()
    results.extend(inputs)
    exits = [x.exit_s for x in results if x.exit_s is not None]
    return {"drills": len(results), "passed": sum(x.passed for x in results),
            "samples_lost": sum(x.samples_lost for x in results),
            "samples_repeated": sum(x.samples_repeated for x in results),
            "max_exit_s": round(max(exits), 2) if exits else None,
            "seconds": round(time.monotonic() - started, 1), "work": str(work),
            "results": [x.to_dict() for x in results]}


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="", help="folder for the drills' runs (default: a new temporary folder)")
    ap.add_argument("--only", default="", help=f"comma-separated subset of {','.join(ALL_DRILLS)}")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (always kept with --work)")
    args = ap.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="stts_fault_drill_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        summary = run_drills(work, [x for x in args.only.split(",") if x] or None)
    finally:
        if not args.work and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    for res in summary["results"]:
        status = "passed" if res["passed"] else "FAILED"
        print(f"[drill] {res['name']:<24} {status}  exit_s={res['exit_s']}  {res['seconds']:.0f} s  "
              + "; ".join(res["failed_checks"] + ([res["error"]] if res["error"] else [])), flush=True)
    print(json.dumps(summary, sort_keys=True))
    return 0 if summary["passed"] == summary["drills"] else 1


if __name__ == "__main__":
    sys.exit(main())
