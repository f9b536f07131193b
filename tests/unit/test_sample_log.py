"""The sample log's surviving timeline (stts_dist/faults.py), which the fault drills compare with
an uninterrupted run (tests/multiprocess/test_fault_drills.py)."""
from stts_dist.faults import compare_timelines, surviving_timeline


def test_surviving_timeline_drops_steps_after_each_restart_point(tmp_path):
    log = tmp_path / "samples.tsv"
    log.write_text("start\t0\t0\t0\n"
                   'step\t0\t0\t1\t["a", "b"]\nstep\t0\t0\t2\t["c", "d"]\nstep\t0\t0\t3\t["e", "f"]\n'
                   "start\t0\t0\t1\n"                                # resumed from step 1: 2 and 3 re-run
                   'step\t0\t0\t2\t["c", "d"]\nstep\t0\t0\t3\t["e", "f"]\nstep\t0\t0\t4\t["g", "h"]\n'
                   'step\t0\t0\t5\t["i"')                            # torn by a kill: ignored
    timeline, starts = surviving_timeline(log)
    assert timeline == {0: {1: ["a", "b"], 2: ["c", "d"], 3: ["e", "f"], 4: ["g", "h"]}} and starts == {0: [0, 1]}
    reference = {0: {1: ["a", "b"], 2: ["c", "d"], 3: ["e", "f"], 4: ["g", "h"]}}
    assert compare_timelines(timeline, reference).identical
    # a restart that resumed too late loses samples; one that replays a step repeats them
    lost = compare_timelines({0: {1: ["a", "b"], 2: ["c", "d"], 4: ["g", "h"]}}, reference)
    assert (lost.lost, lost.repeated, lost.missing_steps) == (2, 0, [(0, 3)])
    repeated = compare_timelines({0: {1: ["a", "b"], 2: ["c", "d"], 3: ["c", "d"], 4: ["g", "h"]}}, reference)
    assert (repeated.lost, repeated.repeated, repeated.mismatched_steps) == (2, 2, [(0, 3)])
