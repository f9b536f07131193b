"""A second generated video QA set, unrelated to the digits: coloured shapes moving over noise.

    python -m data_pipeline.synth_shapes --out data/shapes --train 2000 --test 300 [--frames 8] [--image-size 64]

Writes ``OUT/videos/*.mp4`` (H.264) and two manifests, ``OUT/train.jsonl`` and ``OUT/test.jsonl``
(disjoint seeds), in the manifest format users write for their own footage. Each clip shows one
shape (circle, square or triangle) of one colour (red, green, blue or yellow) crossing the frame
in one direction (left, right, up or down), with its own wording, capitals and punctuation:

    "What colour is the moving shape?"            -> red | green | blue | yellow   (task colour)
    "Which way does the shape move?"              -> left | right | up | down      (task direction, temporal)
    "What kind of shape crosses the screen?"      -> circle | square | triangle    (task shape)

It exists to try the framework on data that is not its built-in task (a vocabulary of its own,
questions a digits tokenizer would not know) -- the README's "your own videos" walk-through and the
tests use it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from data_pipeline.shard_io import atomic_write_bytes
from data_pipeline.synth_digits import write_mp4

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
QUESTIONS = {"colour": "What colour is the moving shape?", "direction": "Which way does the shape move?",
             "shape": "What kind of shape crosses the screen?"}
TASKS = tuple(QUESTIONS)


def shape_mask(shape: str, size: int) -> np.ndarray:
    """(size, size) bool mask of the shape."""
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    c = size / 2
    if shape == "circle":
        return (yy - c) ** 2 + (xx - c) ** 2 <= (size / 2) ** 2
    if shape == "square":
        return np.ones((size, size), bool)
    return np.abs(xx - c) <= yy / 2        # triangle, apex up


def make_clip(index: int, seed: int, frames: int, image_size: int, task: str) -> dict:
    """One clip and its question: ``frames`` (T, H, W, 3) uint8 and the manifest fields."""
    rng = np.random.default_rng([seed, index, 11])
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    direction = rng.choice(list(DIRECTIONS))
    size = max(4, image_size // 4)
    dy, dx = DIRECTIONS[direction]
    span = image_size - size
    start = rng.integers(0, span + 1, size=2)          # the coordinate across the motion stays fixed
    mask = shape_mask(shape, size)
    background = rng.integers(0, 70, size=(image_size, image_size, 3)).astype(np.uint8)
    video = np.repeat(background[None], frames, axis=0)
    for t in range(frames):
        along = round(span * t / max(frames - 1, 1))
        y = (along if dy > 0 else span - along) if dy else start[0]
        x = (along if dx > 0 else span - along) if dx else start[1]
        video[t, y:y + size, x:x + size][mask] = COLOURS[colour]
    answer = {"colour": colour, "direction": direction, "shape": shape}[task]
    return {"frames": video, "question": QUESTIONS[task], "answer": str(answer), "task": task}


def write_split(out: Path, split: str, num: int, seed: int, frames: int, image_size: int, fps: float) -> Path:
    """``num`` clips of ``split`` under ``out/videos`` and their manifest ``out/<split>.jsonl``."""
    (out / "videos").mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(num):
        task = TASKS[index % len(TASKS)]
        clip = make_clip(index, seed, frames, image_size, task)
        rel = f"videos/{split}_{index:06d}.mp4"
        write_mp4(out / rel, clip["frames"], fps)
        lines.append(json.dumps({"video": rel, "question": clip["question"], "answer": clip["answer"],
                                 "id": f"{split}-{index}", "task": task}))
    manifest = out / f"{split}.jsonl"
    atomic_write_bytes(manifest, ("\n".join(lines) + "\n").encode("utf-8"))
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipeline.synth_shapes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (videos/, train.jsonl, test.jsonl)")
    p.add_argument("--train", type=int, default=2000, help="training clips")
    p.add_argument("--test", type=int, default=300, help="held-out clips")
    p.add_argument("--frames", type=int, default=8)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--fps", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if min(args.train, args.test, args.frames) < 1 or args.image_size < 8:
        p.error("need --train, --test, --frames >= 1 and --image-size >= 8")
    out = Path(args.out)
    train = write_split(out, "train", args.train, args.seed, args.frames, args.image_size, args.fps)
    test = write_split(out, "test", args.test, args.seed + 1, args.frames, args.image_size, args.fps)
    print(json.dumps({"train": str(train), "test": str(test), "train_clips": args.train, "test_clips": args.test}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
