"""stts_dist/host_allocator.py: with the setting on, a large tensor comes from glibc's heap (not
a fresh mmap) and its memory stays in the heap after it is freed, ready for the next step; with
it off, glibc maps and unmaps it. Counted with glibc's own mallinfo2, in fresh processes (the
setting is process-wide)."""
import ctypes.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MB64 = 64 * 1024 * 1024

PROBE = '''
import ctypes, json, sys
import torch
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
message = ""
if sys.argv[1] == "keep":
    from stts_dist.host_allocator import keep_freed_blocks
    message = keep_freed_blocks()
def info():
    m = libc.mallinfo2()
    return {"mmapped": m.hblkhd, "heap": m.arena, "heap_free": m.fordblks}
before = info()
t = torch.empty(16 * 1024 * 1024)      # 64 MB, far above glibc's largest mmap threshold (32 MB)
t.fill_(1.0)
alive = info()
del t
freed = info()
print(json.dumps({"message": message, "before": before, "alive": alive, "freed": freed}))
'''


def _glibc_with_mallinfo2() -> bool:
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    return hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallinfo2")


def probe(setting: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, setting], cwd=REPO, capture_output=True, text=True,
                         timeout=120, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2) to count")
def test_large_tensors_come_from_the_heap_and_stay_there():
    kept = probe("keep")
    assert kept["message"].startswith("glibc malloc keeps large freed blocks")
    # alive: served from the heap, no new mapping
    assert kept["alive"]["mmapped"] - kept["before"]["mmapped"] < MB64 // 2, kept
    assert kept["alive"]["heap"] - kept["before"]["heap"] >= MB64, kept
    # freed: the heap keeps the 64 MB (as free space for the next step) instead of trimming it
    assert kept["freed"]["heap"] >= kept["alive"]["heap"] - 4096, kept
    assert kept["freed"]["heap_free"] - kept["alive"]["heap_free"] >= MB64, kept


@pytest.mark.slow
@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="needs glibc >= 2.33 (mallinfo2) to count")
def test_glibc_default_maps_and_unmaps_large_tensors():
    default = probe("default")
    assert default["message"] == ""
    assert default["alive"]["mmapped"] - default["before"]["mmapped"] >= MB64, default
    assert default["alive"]["mmapped"] - default["freed"]["mmapped"] >= MB64, default   # given back at once


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="glibc only")
@pytest.mark.parametrize("keep", [True, False])
def test_trainer_applies_it_when_asked_and_says_so(tmp_path, capsys, keep):
    from conftest import tiny_overrides
    from stts_dist.config import load_config
    from stts_dist.train.trainer import Trainer
    cfg = load_config(None, tiny_overrides(**{"train.out_dir": str(tmp_path), "train.device": "cpu",
                                              "train.keep_freed_host_memory": str(keep).lower()}))
    Trainer(cfg).close()
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[host]")]
    assert said == (["[host] glibc malloc keeps large freed blocks for reuse (no mmap/munmap per step; "
                     "train.keep_freed_host_memory=false turns it off)"] if keep else [])
