"""Sharding job: JSONL manifest -> WebDataset tar shards + ``index.json``, orchestrated by Ray.

    python -m data_pipeline.build_shards --config jobs/build_shards.yaml manifest=m.jsonl out_dir=shards/

The driver parses the manifest (strictly), cuts it into work units of ``samples_per_shard``
entries (unit ``u`` -> ``shard-{u:06d}.tar``), runs the units as Ray tasks, and finally writes
``index.json`` (per-sample token numbers for planners) and ``errors.jsonl`` (skipped samples).

Resumable: ``plan.json`` freezes the unit split on the first run; a unit whose done-marker and
shard are present is skipped on a rerun, so a crashed or interrupted job is finished by running
the same command again. Rerunning into a folder built from another manifest or config is refused.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from omegaconf import OmegaConf

from data_pipeline.config import ShardingConfig, as_sharding_config, load_sharding_config
from data_pipeline.errors import DataPipelineError, ShardingError, VideoReadError
from data_pipeline.manifest import ManifestEntry, cap_per_task, read_manifest
from data_pipeline.records import encode_members, text_token_counter
from data_pipeline.shard_io import atomic_write_bytes, atomic_write_json, marker_name, remove_stale_temp_files
from data_pipeline.shard_worker import decode_entry, describe_failure, process_unit, sample_key
from stts_dist.tokenizer import WordTokenizer
from stts_dist.checkpoint import sha256_file

PLAN_FILE, INDEX_FILE, ERRORS_FILE = "plan.json", "index.json", "errors.jsonl"
# The word vocabulary of the manifest's questions and answers (stts_dist.tokenizer.WordTokenizer):
# a run trained on these shards without a pretrained LLM tokenizer uses it.
VOCAB_FILE = "tokenizer.json"
INDEX_VERSION = 2          # 2: no pruning ratio and no per-ratio budgets in the rows
# Fields that change shard content or index numbers; a rerun must agree on all of them.
CONTENT_FIELDS = ("image_size", "patch_size", "pool_size", "fps", "max_frames", "frame_format",
                  "jpeg_quality", "target_shard_bytes", "samples_per_shard", "samples_per_task")
PROBE_SAMPLES, PROBE_TRIES = 3, 16
file_sha256 = sha256_file


def content_config(cfg: Any, tokenizer_name: str) -> dict[str, Any]:
    out = {k: cfg[k] for k in CONTENT_FIELDS}
    out["text_tokenizer"] = tokenizer_name
    return out


def keyed_shard_dir(work_dir: str | os.PathLike, manifest: str | os.PathLike, cfg: Any = None) -> Path:
    """``<work_dir>/shards_<manifest name>_<key>``: the shard folder of one input. ``key`` hashes
    the manifest's bytes and the settings that change shard content, so two manifests (or one
    manifest at two frame sizes) never share a folder, and the same input always finds its shards."""
    path = Path(manifest)
    name = path.stem if path.stem not in ("manifest", "train", "data") else f"{path.parent.name}_{path.stem}"
    if not path.is_file():       # ensure_shards names the problem
        return Path(work_dir) / f"shards_{name}"
    base = OmegaConf.merge(OmegaConf.structured(ShardingConfig), cfg if cfg is not None else {})
    spec = {"manifest_sha256": file_sha256(path),
            "content": content_config(base, text_token_counter()[1])}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    return Path(work_dir) / f"shards_{name}_{key}"


def probe_bytes_per_sample(entries: list[ManifestEntry], cfg: Any) -> float:
    """Mean encoded bytes of the first few decodable samples (decoded here, on the driver)."""
    sizes = []
    for entry in entries[:PROBE_TRIES]:
        try:
            clip = decode_entry(entry, cfg)
        except VideoReadError:
            continue
        record = {"id": entry.id, "question": entry.question, "answer": entry.answer, "pad": "x" * 512}
        members = encode_members(sample_key(entry), clip, record, cfg)
        sizes.append(sum(len(v) + 1024 for k, v in members.items() if k != "__key__"))  # + tar headers
        if len(sizes) == PROBE_SAMPLES:
            break
    if sizes:
        return sum(sizes) / len(sizes)
    raw = cfg.max_frames * cfg.image_size ** 2 * 3  # nothing decodable in the probe: assume raw frames
    return float(raw if cfg.frame_format == "npy" else raw // 8)


def make_plan(entries: list[ManifestEntry], cfg: Any, manifest_sha: str, tokenizer_name: str,
              parallelism: int) -> dict[str, Any]:
    """Unit size: ``samples_per_shard``, or as many samples as fit ``target_shard_bytes`` but
    small enough that every CPU gets at least two units."""
    if cfg.samples_per_shard > 0:
        per_shard = cfg.samples_per_shard
    else:
        per_sample = probe_bytes_per_sample(entries, cfg)
        per_shard = max(1, int(cfg.target_shard_bytes // per_sample))
        per_shard = max(1, min(per_shard, math.ceil(len(entries) / (2 * max(1, parallelism)))))
    plan = {"manifest_sha256": manifest_sha, "content": content_config(cfg, tokenizer_name),
            "samples_per_unit": per_shard, "num_entries": len(entries),
            "num_units": math.ceil(len(entries) / per_shard)}
    plan["plan_hash"] = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]
    return plan


def check_plan_compatible(existing: dict[str, Any], manifest_sha: str, content: dict[str, Any], out_dir: Path) -> None:
    diffs = []
    if existing.get("manifest_sha256") != manifest_sha:
        diffs.append("manifest content")
    for k, v in content.items():
        if existing.get("content", {}).get(k) != v:
            diffs.append(f"{k} (was {existing.get('content', {}).get(k)!r}, now {v!r})")
    if diffs:
        raise ShardingError(f"{out_dir} already holds shards built from a different input: {', '.join(diffs)}. "
                            "Use a new out_dir, or delete this one to rebuild it")


def load_or_make_plan(out_dir: Path, entries: list[ManifestEntry], cfg: Any, manifest_sha: str,
                      tokenizer_name: str, parallelism: int) -> dict[str, Any]:
    path = out_dir / PLAN_FILE
    if path.is_file():
        existing = json.loads(path.read_text())
        check_plan_compatible(existing, manifest_sha, content_config(cfg, tokenizer_name), out_dir)
        return existing
    plan = make_plan(entries, cfg, manifest_sha, tokenizer_name, parallelism)
    atomic_write_json(path, plan)
    return plan


def finished_unit(out_dir: Path, unit: int, plan_hash: str) -> dict[str, Any] | None:
    """The unit's marker if the unit is complete for this plan (marker + intact shard), else None."""
    marker = out_dir / marker_name(unit)
    if not marker.is_file():
        return None
    try:
        result = json.loads(marker.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if result.get("plan_hash") != plan_hash:
        return None
    if result["shard"] is not None:
        shard = out_dir / result["shard"]
        if not shard.is_file() or shard.stat().st_size != result["bytes"]:
            return None
    return result


def split_units(entries: list[ManifestEntry], per_unit: int) -> list[list[ManifestEntry]]:
    return [entries[i:i + per_unit] for i in range(0, len(entries), per_unit)]


def run_units_on_ray(todo: list[tuple[int, list[ManifestEntry]]], cfg: Any, out_dir: Path, plan_hash: str,
                     on_done: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
    """Run units as Ray tasks (at most 4 per CPU in flight); returns failures after retries."""
    import ray

    task = ray.remote(num_cpus=1, max_retries=cfg.max_retries, retry_exceptions=True)(process_unit)
    cfg_dict = OmegaConf.to_container(cfg)
    window = max(4, 4 * int(ray.cluster_resources().get("CPU", 1)))
    queue = list(todo)
    in_flight: dict[Any, int] = {}
    failures = []
    while queue or in_flight:
        while queue and len(in_flight) < window:
            unit, entries = queue.pop(0)
            ref = task.remote(unit, [e.to_dict() for e in entries], cfg_dict, str(out_dir), plan_hash)
            in_flight[ref] = unit
        done, _ = ray.wait(list(in_flight), num_returns=1)
        for ref in done:
            unit = in_flight.pop(ref)
            try:
                on_done(ray.get(ref))
            except Exception as e:  # retries exhausted
                failures.append({"unit": unit, "error": describe_failure(e)})
    return failures


def write_vocabulary(out_dir: Path, entries: list[ManifestEntry]) -> None:
    """``tokenizer.json``: the word vocabulary of every question and answer of the manifest."""
    vocab = WordTokenizer.from_texts(t for e in entries for t in e.texts)
    atomic_write_bytes(Path(out_dir) / VOCAB_FILE, vocab.to_json().encode())


def write_index(out_dir: Path, plan: dict[str, Any], results: list[dict[str, Any]]) -> dict[str, Any]:
    """``index.json`` (shards + per-sample rows, unit order) and ``errors.jsonl`` (line order)."""
    results = sorted(results, key=lambda r: r["unit"])
    shards = [{"name": r["shard"], "samples": len(r["rows"]), "bytes": r["bytes"]} for r in results if r["shard"]]
    rows = [row for r in results for row in r["rows"]]
    errors = sorted((e for r in results for e in r["errors"]), key=lambda e: e["line"])
    index = {"version": INDEX_VERSION, "plan_hash": plan["plan_hash"], "config": plan["content"],
             "num_samples": len(rows), "num_shards": len(shards), "num_skipped": len(errors),
             "shards": shards, "samples": rows}
    atomic_write_bytes(out_dir / ERRORS_FILE, "".join(json.dumps(e, sort_keys=True) + "\n" for e in errors).encode())
    atomic_write_bytes(out_dir / INDEX_FILE, json.dumps(index, sort_keys=True).encode())
    return index


def build_shards(cfg: Any) -> dict[str, Any]:
    """Run the whole job; returns the summary (also printed by the CLI). Raises
    :class:`ShardingError` when units still fail after ``max_retries`` (rerun to resume)."""
    from tqdm import tqdm

    from data_pipeline.ray_session import ray_session

    cfg = as_sharding_config(cfg)
    started = time.perf_counter()
    manifest = Path(cfg.manifest)
    out_dir = Path(cfg.out_dir)
    entries = cap_per_task(read_manifest(manifest), cfg.samples_per_task)
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = remove_stale_temp_files(out_dir)
    _, tokenizer_name = text_token_counter()

    with ray_session(cfg.ray_address, cfg.num_cpus):
        import ray

        cpus = int(ray.cluster_resources().get("CPU", 1))
        plan = load_or_make_plan(out_dir, entries, cfg, file_sha256(manifest), tokenizer_name, cpus)
        units = split_units(entries, plan["samples_per_unit"])
        results = {}
        todo = []
        for u, unit_entries in enumerate(units):
            done = finished_unit(out_dir, u, plan["plan_hash"])
            if done is not None:
                results[u] = done
            else:
                todo.append((u, unit_entries))
        pending_samples = sum(len(e) for _, e in todo)
        bar = tqdm(total=pending_samples, unit="clip", desc="sharding", disable=not cfg.progress_bar,
                   dynamic_ncols=True)
        work_seconds = 0.0

        def on_done(result: dict[str, Any]) -> None:
            nonlocal work_seconds
            results[result["unit"]] = result
            work_seconds += result["seconds"]
            bar.update(result["entries"])
            bar.set_postfix(skipped=sum(len(r["errors"]) for r in results.values()))

        run_started = time.perf_counter()
        failures = run_units_on_ray(todo, cfg, out_dir, plan["plan_hash"], on_done) if todo else []
        run_seconds = time.perf_counter() - run_started
        bar.close()

    processed = sum(len(units[u]) for u, _ in todo) - sum(len(units[f["unit"]]) for f in failures)
    summary: dict[str, Any] = {
        "out_dir": str(out_dir), "manifest_samples": len(entries), "units": len(units),
        "units_run": len(todo) - len(failures), "units_skipped_done": len(units) - len(todo),
        "units_failed": len(failures), "stale_temp_files_removed": stale, "cpus": cpus,
        "clips_processed": processed, "seconds": round(time.perf_counter() - started, 3),
        "clips_per_s": round(processed / run_seconds, 3) if processed else 0.0,
        "clips_per_s_per_cpu": round(processed / run_seconds / cpus, 3) if processed else 0.0,
        "clips_per_cpu_second": round(processed / work_seconds, 3) if work_seconds else 0.0,
    }
    if failures:
        summary["failures"] = failures
        raise ShardingError(f"{len(failures)} of {len(units)} work units failed after {cfg.max_retries} retries "
                            f"(first: unit {failures[0]['unit']}: {failures[0]['error']}). Finished units are "
                            "kept; rerun the same command to retry the rest")
    write_vocabulary(out_dir, entries)
    index = write_index(out_dir, plan, list(results.values()))
    skipped_by_kind: dict[str, int] = {}
    for r in results.values():
        for e in r["errors"]:
            skipped_by_kind[e["kind"]] = skipped_by_kind.get(e["kind"], 0) + 1
    summary.update({"samples_written": index["num_samples"], "samples_skipped": index["num_skipped"],
                    "skipped_by_kind": skipped_by_kind, "shards": index["num_shards"],
                    "shard_bytes": sum(s["bytes"] for s in index["shards"])})
    return summary


def index_is_current(out_dir: Path, manifest: Path, cfg: Any) -> bool:
    """True when ``out_dir`` holds a finished index built from this manifest and config."""
    plan_path, index_path = out_dir / PLAN_FILE, out_dir / INDEX_FILE
    if not (plan_path.is_file() and index_path.is_file() and (out_dir / VOCAB_FILE).is_file()):
        return False
    plan = json.loads(plan_path.read_text())
    check_plan_compatible(plan, file_sha256(manifest), content_config(cfg, text_token_counter()[1]), out_dir)
    with open(index_path) as f:
        return json.load(f).get("plan_hash") == plan["plan_hash"]


def ensure_shards(source_path: str | os.PathLike, out_dir: str | os.PathLike, cfg: Any = None) -> Path:
    """Shard folder for ``source_path``: the folder itself if it already holds shards
    (``index.json``); for a JSONL manifest, ``out_dir`` after sharding it (skipped when ``out_dir``
    is already current for this manifest and config). ``cfg``: ShardingConfig / dict / None."""
    src = Path(source_path)
    if src.is_dir():
        if not (src / INDEX_FILE).is_file():
            raise ShardingError(f"{src} is a folder without {INDEX_FILE}; pass a shard folder written by "
                                "python -m data_pipeline.build_shards, or a manifest .jsonl file")
        return src
    if not src.is_file():
        raise ShardingError(f"data source not found: {src}; pass a shard folder or a manifest .jsonl file")
    if src.suffix not in (".jsonl", ".json"):
        raise ShardingError(f"{src} is neither a shard folder nor a .jsonl manifest")
    base = OmegaConf.merge(OmegaConf.structured(ShardingConfig), cfg if cfg is not None else {})
    base.manifest, base.out_dir = str(src), str(out_dir)
    sharding = as_sharding_config(base)
    dst = Path(out_dir)
    if index_is_current(dst, src, sharding):
        return dst
    build_shards(sharding)
    return dst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.build_shards", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML onto ShardingConfig (e.g. jobs/build_shards.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. out_dir=/data/shards num_cpus=8")
    args = parser.parse_args(argv)
    try:
        cfg = load_sharding_config(args.config, args.overrides)
        summary = build_shards(cfg)
    except (DataPipelineError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"sharded {summary['samples_written']} samples into {summary['shards']} shards "
          f"({summary['shard_bytes'] / 1e6:.1f} MB), skipped {summary['samples_skipped']} "
          f"{summary['skipped_by_kind'] or ''} (see {Path(cfg.out_dir) / ERRORS_FILE}); "
          f"units run {summary['units_run']}, already done {summary['units_skipped_done']}; "
          f"{summary['clips_per_s']} clips/s = {summary['clips_per_s_per_cpu']} clips/s per CPU "
          f"on {summary['cpus']} CPUs", file=sys.stderr)
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
