"""Property-based fuzzing of every parser that reads data from outside the program.

Manifest lines (``data_pipeline/manifest.py``), shard members and their JSON records
(``data_pipeline/safe_decode.py`` and the loader's record check), and run configs
(``stts_dist/config.py``: random YAML files and ``key=value`` overrides). The property is the
same everywhere: any input either parses or raises the project's own error type, whose message
names what is wrong -- never a ``KeyError``, ``ZeroDivisionError``, ``RecursionError``, an
OmegaConf exception, or code execution. Budgets are fixed so the module stays fast.
"""
from __future__ import annotations

import io
import json
import string
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from data_pipeline.errors import ManifestError, ShardFormatError, UnsafeMemberError
from data_pipeline.manifest import OPTIONAL_KEYS, REQUIRED_KEYS, ManifestEntry, parse_manifest_line, read_manifest
from data_pipeline.safe_decode import check_member_name, decode_member, decode_sample
from stts_dist.config import ConfigError, RunConfig, load_config

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                         HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


# -- manifest lines ------------------------------------------------------------------------------

manifest_keys = st.sampled_from(REQUIRED_KEYS + OPTIONAL_KEYS) | st.text(max_size=10)
manifest_objects = st.dictionaries(manifest_keys, json_values, max_size=10)


def _parse(text: str, tmp: Path) -> ManifestEntry | None:
    try:
        return parse_manifest_line(text, 7, tmp)
    except ManifestError as e:
        assert str(e).startswith("manifest line 7: ")      # names the line
        return None


@pytest.mark.slow
@FUZZ
@given(obj=manifest_objects)
def test_manifest_objects_parse_or_raise_manifest_error(obj, tmp_path):
    entry = _parse(json.dumps(obj), tmp_path)
    if entry is not None:                                   # accepted: every field has its type
        assert all(isinstance(getattr(entry, k), str) for k in ("id", "video", "question", "answer", "task"))
        assert set(obj) <= set(REQUIRED_KEYS + OPTIONAL_KEYS)
        assert entry.start is None or entry.start >= 0


@FUZZ
@given(text=st.text(max_size=80) | st.text(alphabet='{}[]":,0123456789.eE-+ntruefalsvido ', max_size=80))
@example(text="[" * 100_000)                               # nesting deeper than the JSON parser's stack
@example(text='{"video": "a", "question": "q", "answer": "a", "id": ' + "9" * 5000 + "}")  # > int digit limit
@example(text='{"video": "a", "question": "q", "answer": "a", "start": NaN}')
@example(text='{"video": "a", "question": "q", "answer": "a", "start": 1e999}')
def test_manifest_text_parses_or_raises_manifest_error(text, tmp_path):
    _parse(text, tmp_path)


@FUZZ
@given(data=st.binary(max_size=200))
@example(data=b'{"video": "a.mp4", "question": "q", "answer": "\xff"}\n')   # not UTF-8
def test_manifest_files_of_random_bytes_raise_only_manifest_error(data, tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(data)
    try:
        read_manifest(path)
    except ManifestError as e:
        assert str(path) in str(e)


# -- shard members -------------------------------------------------------------------------------

class _TouchOnUnpickle:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


member_exts = st.sampled_from(["json", "txt", "000.jpg", "001.jpeg", "002.png", "003.npy", "pyd", "pickle", "pth",
                               "000.pyd", "npy", "json.gz", "1.jpg"]) | st.text(max_size=8)


@FUZZ
@given(key=st.text(max_size=12), ext=member_exts)
def test_member_names_are_allowed_or_rejected_by_name(key, ext):
    name = f"{key}.{ext}"
    try:
        k, e = check_member_name("s.tar", name)
    except UnsafeMemberError as err:
        assert f"member '{name}'" in str(err)
    else:
        assert k == key and e == ext and e.split(".")[-1] in ("json", "txt", "jpg", "jpeg", "png", "npy")


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


npy_arrays = st.builds(
    lambda shape, dtype: np.zeros(shape, dtype=dtype),
    st.lists(st.integers(0, 5), min_size=0, max_size=4).map(tuple),
    st.sampled_from([np.uint8, np.int16, np.float32, np.bool_]))
member_payloads = (st.binary(max_size=300) | npy_arrays.map(_npy) | json_values.map(lambda v: json.dumps(v).encode())
                   | st.binary(max_size=64).map(lambda b: b"\x89PNG\r\n\x1a\n" + b)
                   | st.binary(max_size=64).map(lambda b: b"\xff\xd8\xff\xe0" + b)
                   | st.binary(max_size=64).map(lambda b: b"\x93NUMPY\x01\x00" + b))


@FUZZ
@given(ext=st.sampled_from(["json", "txt", "000.jpg", "000.jpeg", "000.png", "000.npy"]), data=member_payloads)
def test_member_bytes_decode_or_raise_shard_format_error(ext, data):
    try:
        value = decode_member("s.tar", f"k.{ext}", ext, data)
    except ShardFormatError as e:
        assert "shard s.tar: member 'k." in str(e)
    else:
        if ext.endswith((".jpg", ".jpeg", ".png", ".npy")):
            assert value.dtype == np.uint8 and value.ndim == 3 and value.shape[2] == 3


def test_pickled_npy_member_is_refused_and_never_executed(tmp_path):
    sentinel = tmp_path / "executed"
    payload = _npy(np.array([_TouchOnUnpickle(str(sentinel))], dtype=object))
    np.load(io.BytesIO(payload), allow_pickle=True)
    assert sentinel.exists()                                 # the payload is live ...
    sentinel.unlink()
    with pytest.raises(ShardFormatError, match=r"member 'k\.000\.npy' is corrupt"):
        decode_member("s.tar", "k.000.npy", "000.npy", payload)
    assert not sentinel.exists()                             # ... and was not run


@FUZZ
# member names never start with "__": WebDataset reserves those keys for the sample's own
# metadata (a generated "__url__" would replace the shard name the assertion looks for)
@given(members=st.dictionaries(member_exts.filter(lambda e: not e.startswith("__")), member_payloads, max_size=4),
       key=st.text(max_size=6))
def test_samples_decode_or_raise_shard_errors(members, key):
    sample = {"__key__": key, "__url__": "s.tar", **members}
    try:
        out = decode_sample(sample)
    except ShardFormatError as e:                           # UnsafeMemberError is one
        assert "shard s.tar" in str(e)
    else:
        assert out.get("frames") is None or out["frames"].dtype == np.uint8


@FUZZ
@given(record=json_values | st.dictionaries(st.sampled_from(
    ["timestamps", "native_fps", "original_size", "source", "question", "answer", "id", "task", "fps", "turns",
     "meta"]), json_values, max_size=11))
@pytest.mark.slow
def test_loader_records_are_used_or_raise_shard_format_error(record):
    """The ``<key>.json`` record as the loader turns it into a training sample."""
    from data_pipeline.dataset_index import DatasetIndex
    from data_pipeline.loader import _sample_from

    index = DatasetIndex(name="d", root=Path("."), shard_names=["s.tar"], shard_bytes=np.array([0]),
                         shard_of_sample=np.array([0]), keys=["k"], ids=["k"], tasks=[""], frames=np.array([2]),
                         patches_per_frame=np.array([16]), groups_per_frame=np.array([4]),
                         text_tokens=np.array([3]), is_video=np.array([True]),
                         config={})
    decoded = {"__key__": "k", "__url__": "s.tar", "json": record, "frames": np.zeros((2, 4, 4, 3), np.uint8)}
    try:
        sample = _sample_from(decoded, index, 0, 0, "uint8")
    except ShardFormatError as e:
        assert "shard s.tar: sample 'k'" in str(e)
    else:
        assert sample["frames"].shape == (2, 4, 4, 3)


# -- run configs ---------------------------------------------------------------------------------

def _schema_keys() -> list[str]:
    from omegaconf import OmegaConf

    keys = []

    def rec(node, prefix):
        for k, v in node.items():
            keys.append(prefix + k)
            if isinstance(v, dict):
                rec(v, prefix + k + ".")
    rec(OmegaConf.to_container(OmegaConf.structured(RunConfig)), "")
    return keys


SCHEMA_KEYS = _schema_keys()
yaml_scalars = (st.none() | st.booleans() | st.integers(-3, 1000) | st.floats(allow_nan=True)
                | st.sampled_from(["???", "${oc.env:HOME}", "${nope}", "${model.vit.width}", "\\${x}", "${",
                                   "__import__('os').system('true')", "!!python/object/apply:os.system ['true']",
                                   "scorer", "gloo", "[1, 2]", "{a: 1}", "0x10", "1e3", ".inf"])
                | st.text(alphabet=string.printable, max_size=12))
config_values = st.recursive(yaml_scalars, lambda inner: st.lists(inner, max_size=3)
                             | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
config_keys = st.sampled_from(SCHEMA_KEYS) | st.text(alphabet=string.ascii_lowercase + "._", max_size=12)


def _nest(flat: dict) -> dict:
    out: dict = {}
    for dotted, value in flat.items():
        node, parts = out, [p for p in dotted.split(".") if p] or ["x"]
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                break
            node = nxt
        else:
            node[parts[-1]] = value
    return out


def _read_every_value(cfg) -> None:
    """Reading a value resolves OmegaConf interpolations; nothing may be left that fails then."""
    from omegaconf import OmegaConf
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def _load(path, overrides):
    try:
        return load_config(path, overrides)
    except ConfigError as e:
        assert str(e)
        return None


@pytest.mark.slow
@FUZZ
@given(flat=st.dictionaries(config_keys, config_values, max_size=6))
@example(flat={"name": "${nope}"})
@example(flat={"data.follow_up_questions": "${nope}"})     # read by the old-format upgrade before validation
@example(flat={"data": "${nope}"})
@example(flat={"name": "???"})
@example(flat={"data.tasks": ["count", "${oc.env:HOME}", "\\${x}"]})
@example(flat={"train.steps": "${oc.env:HOME}"})
@example(flat={"model.stts.prune_ratio": "\\${x}"})
@example(flat={"model": "${oc.env:HOME}"})
def test_random_yaml_configs_load_or_raise_config_error(flat, tmp_path):
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_nest(flat)))
    cfg = _load(path, [])
    if cfg is not None:
        _read_every_value(cfg)


@pytest.mark.slow
@FUZZ
@given(text=st.text(alphabet=string.printable, max_size=120))
@example(text="!!python/object/apply:os.system ['touch /tmp/stts-fuzz-pwned']")
@example(text="name: !!python/object/new:os.system [touch /tmp/stts-fuzz-pwned]")
@example(text="a: &a [*a]")
@example(text="- 1\n- 2\n")
def test_random_yaml_text_loads_or_raises_config_error(text, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    _load(path, [])
    assert not Path("/tmp/stts-fuzz-pwned").exists()


@FUZZ
@given(overrides=st.lists(
    st.tuples(config_keys, yaml_scalars.map(str) | st.text(alphabet=string.printable, max_size=10))
    .map(lambda kv: f"{kv[0]}={kv[1]}") | st.text(alphabet=string.printable, max_size=20), max_size=4))
@pytest.mark.slow
@example(overrides=["model.vit.patch_size=0"])
@example(overrides=["model.vit.heads=0"])
@example(overrides=["model.llm.kv_heads=0"])
@example(overrides=["model.connector.pool_heads=0"])
@example(overrides=["=3"])
@example(overrides=["model.stts=3"])
@example(overrides=["name=${oc.env:HOME}", "train.steps=${oc.env:HOME}"])
def test_random_overrides_load_or_raise_config_error(overrides):
    cfg = _load(None, overrides)
    if cfg is not None:
        _read_every_value(cfg)
