"""One work unit of the sharding job: manifest entries -> one tar shard + its done-marker.

Plain Python with no Ray dependency, so it can be unit-tested and run inline; the driver in
:mod:`data_pipeline.build_shards` wraps it as a Ray task. A bad video skips only its sample
(recorded in the marker's ``errors``); anything else (disk full, a bug) fails the unit, which Ray
retries. The unit is idempotent: same inputs -> same shard bytes under the same name.
"""
from __future__ import annotations

import time
import traceback
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from data_pipeline.errors import VideoReadError
from data_pipeline.manifest import ManifestEntry
from data_pipeline.records import build_record, count_text_tokens, encode_members, index_row, text_token_counter
from data_pipeline.shard_io import AtomicTarWriter, atomic_write_json, marker_name, shard_name
from data_pipeline.video import DecodedClip, read_clip


def sample_key(entry: ManifestEntry) -> str:
    """WebDataset key of a sample: from its manifest line, so it is unique and has no dots."""
    return f"s{entry.line:09d}"


def error_row(entry: ManifestEntry, kind: str, reason: str) -> dict[str, Any]:
    return {"line": entry.line, "id": entry.id, "video": entry.video_ref, "kind": kind, "reason": reason}


def decode_entry(entry: ManifestEntry, cfg: Any) -> DecodedClip:
    """Frames of one entry; every failure becomes a :class:`VideoReadError` with a kind."""
    try:
        return read_clip(entry.video, cfg.image_size, cfg.fps, cfg.max_frames, entry.start, entry.end)
    except VideoReadError:
        raise
    except MemoryError:
        raise
    except Exception as e:  # decoders raise a zoo of types on hostile input; the sample is skipped
        raise VideoReadError(f"{entry.video}: {type(e).__name__}: {e}", kind="decode_error") from None


def process_unit(unit: int, entries: list[dict[str, Any]], cfg: dict[str, Any], out_dir: str,
                 plan_hash: str) -> dict[str, Any]:
    """Write ``shard-{unit:06d}.tar`` from ``entries`` (``ManifestEntry.to_dict()`` rows) and its
    done-marker; returns the marker's content (index rows, errors, bytes, seconds)."""
    started = time.perf_counter()
    conf = OmegaConf.create(cfg)
    out = Path(out_dir)
    count, _ = text_token_counter()
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    shard: str | None = shard_name(unit)
    with AtomicTarWriter(out / shard) as writer:
        for raw in entries:
            entry = ManifestEntry.from_dict(raw)
            try:
                clip = decode_entry(entry, conf)
            except VideoReadError as e:
                errors.append(error_row(entry, e.kind, str(e)))
                continue
            key = sample_key(entry)
            record = build_record(entry, clip, key, conf, count_text_tokens(entry, count))
            writer.write(encode_members(key, clip, record, conf))
            rows.append(index_row(record, shard))
        if rows:
            nbytes = writer.commit()
        else:  # every video of the unit was bad: no empty shard, the marker still records the errors
            writer.abort()
            shard, nbytes = None, 0
    result = {"unit": unit, "plan_hash": plan_hash, "shard": shard, "bytes": nbytes, "rows": rows,
              "errors": errors, "entries": len(entries), "seconds": round(time.perf_counter() - started, 4)}
    atomic_write_json(out / marker_name(unit), result)
    return result


def describe_failure(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()[-2000:]
