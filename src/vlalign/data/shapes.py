"""The embedded default data set: a synthetic world of coloured geometric shapes, with ground truth for everything.

Each image (48 x 48 px by default) shows 1 to 4 shapes of distinct types on a plain dark background, one per
cell of a 2 x 2 grid with jitter, so they never overlap and stay recognisable. From the ground truth (type,
colour and cell of every shape) this module writes, deterministically under a seed::

    out_dir/
      sft/{train,val}-%06d.tar          "sft": captions, questions, yes/no object questions, multi-turn chats
      preference/{train,val}-%06d.tar   "preference": chosen = correct, rejected = corrupted; caption records
                                        also carry 3 ranked candidates with the five graded attributes
      prompts/{train,test}-%06d.tar     "prompt": caption prompts, answer = caption, objects = the shape types
      eval/images/<image_id>.png        the test images (the same as prompts/test)
      eval/pope_{random,popular,adversarial}.jsonl   POPE questions in the official layout
      eval/chair_vocab.json, eval/chair_gt.json      CHAIR synonyms and ground-truth objects
      eval/captions_prompts.jsonl       caption prompts for CHAIR
      manifest.json                     arguments, generator version, counts and paths

Every training image gives one record of each kind (same image, same id). ``python data_prep/shapes.py`` builds
it; ``ensure_shapes(out_dir)`` (called by ``ShardDataModule.prepare_data``) builds it only when the manifest is
missing or was made with other arguments. A build writes into a temporary directory beside ``out_dir`` and renames
it into place, so an interrupted build never looks complete.

The world has statistics on purpose, so that POPE's three negative samplings differ (Li et al., EMNLP 2023):
shape types follow a fixed Zipf prior (circle most frequent, cross least), and each type has a partner it often
appears with (circle-cross, square-star, triangle-diamond). "popular" negatives are the most frequent absent
types; "adversarial" ones are the absent types that co-occur most with those present, often the rare partners.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence

from PIL import Image, ImageDraw

from .schema import IMAGE_TOKEN, PreferenceRecord, PromptRecord, SFTRecord
from .shards import ShardWriter

GENERATOR = "vlalign.data.shapes"
VERSION = 1  # bump on any change to drawing, sampling or text: ensure_shapes then rebuilds old worlds

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
COLOURS = {  # far apart in hue or brightness, so they stay distinct at 48 px after anti-aliasing
    "red": (220, 40, 40),
    "green": (40, 190, 70),
    "blue": (50, 110, 245),
    "yellow": (240, 220, 50),
    "purple": (160, 70, 220),
    "orange": (250, 140, 30),
    "white": (235, 235, 235),
}
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # the 2 x 2 grid cells, reading order
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six")

SHAPE_PRIOR = {s: 1.0 / (i + 1) for i, s in enumerate(SHAPES)}  # Zipf: circle 1, square 1/2, ..., cross 1/6
PARTNERS = {"circle": "cross", "cross": "circle", "square": "star", "star": "square",
            "triangle": "diamond", "diamond": "triangle"}
PAIR_PROB = 0.7  # chance that a further shape is the partner of one already drawn (when that one is free)
COUNT_WEIGHTS = {1: 0.3, 2: 0.35, 3: 0.25, 4: 0.1}  # shapes per image
STRATEGIES = ("random", "popular", "adversarial")  # POPE's negative samplings
POPE_PER_IMAGE = 2  # positives (and as many negatives) per image, at most

# Text templates. Wording is British ("colour"); CHAIR's object words are only ever the shape names.
CAPTION_PROMPTS = ("Describe the image.", "What is in the image?", "Describe the image briefly.",
                   "What shapes are in the image?")
DETAILED_PROMPTS = ("Describe the image in detail.", "Describe each shape and where it is.")
CAPTION_TEMPLATES = ("There {be} {n} {noun}: {items}.", "The image shows {n} {noun}: {items}.",
                     "{N} {noun} on a dark background: {items}.")
DETAILED_TEMPLATE = "There {be} {n} {noun} on a dark background: {items}."
QUESTIONS = {
    "count": ("How many shapes are there?", "How many shapes are in the image?", "Count the shapes."),
    "colour": ("What colour is the {shape}?", "Which colour is the {shape}?"),
    "shape": ("What shape is {colour}?", "Which shape is {colour}?", "What is the {colour} shape?"),
    "position": ("Where is the {shape}?", "In which part of the image is the {shape}?"),
    "yes_no": ("Is there a {shape} in the image?",),  # POPE's wording, verbatim
}
CAPTION_TEST_PROMPT = "Describe the image."  # prompts/test and CHAIR's caption prompts

CHAIR_SYNONYMS = {  # canonical object -> words a caption may use for it (eval/chair.py adds regular plurals)
    "circle": ["circle", "circles", "disc", "discs", "disk", "disks", "ring", "rings", "dot", "dots", "ball",
               "balls", "oval", "ovals"],
    "square": ["square", "squares", "box", "boxes", "block", "blocks", "rectangle", "rectangles", "cube", "cubes"],
    "triangle": ["triangle", "triangles", "pyramid", "pyramids", "wedge", "wedges"],
    "diamond": ["diamond", "diamonds", "rhombus", "rhombuses", "rhombi", "lozenge", "lozenges"],
    "star": ["star", "stars", "pentagram", "pentagrams", "asterisk", "asterisks"],
    "cross": ["cross", "crosses", "plus", "plus sign", "plus signs"],
}

ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")  # mllm-dpo's five, 0-4

SFT_TASKS = {"caption": 0.3, "qa": 0.25, "yes_no": 0.25, "multi_turn": 0.2}
PREFERENCE_TASKS = {"caption": 0.5, "qa": 0.25, "yes_no": 0.25}
DETAILED_SHARE = 1 / 3  # of caption turns that ask for positions too


# ---------------------------------------------------------------------------------------------------- the world
@dataclass(frozen=True)
class SceneObject:
    """One drawn shape: type, colour name, grid cell (index into ``POSITIONS``), centre and radius in pixels."""

    shape: str
    colour: str
    cell: int
    x: float
    y: float
    radius: float
    rgb: tuple[int, int, int]

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]


@dataclass(frozen=True)
class Scene:
    """An image's ground truth: objects in reading order (by grid cell), distinct shape types."""

    id: str
    size: int
    background: tuple[int, int, int]
    objects: tuple[SceneObject, ...]

    @property
    def shapes(self) -> list[str]:
        return [o.shape for o in self.objects]

    def to_json(self) -> list[dict]:
        return [{"shape": o.shape, "colour": o.colour, "position": o.position} for o in self.objects]


def sample_shape_types(rng: random.Random, n: int) -> list[str]:
    """``n`` distinct shape types: the first from the Zipf prior, each further one the free partner of a type
    already drawn with probability ``PAIR_PROB``, else from the prior over the remaining types."""
    chosen: list[str] = []
    while len(chosen) < n:
        partners = sorted({PARTNERS[s] for s in chosen} - set(chosen), key=SHAPES.index)
        if partners and rng.random() < PAIR_PROB:
            chosen.append(rng.choice(partners))
            continue
        free = [s for s in SHAPES if s not in chosen]
        chosen.append(rng.choices(free, [SHAPE_PRIOR[s] for s in free])[0])
    return chosen


def sample_scene(rng: random.Random, image_id: str, size: int = 48) -> Scene:
    """Draw a scene's ground truth: 1-4 shapes (``COUNT_WEIGHTS``) in distinct cells, random colours, jitter."""
    n = rng.choices(list(COUNT_WEIGHTS), list(COUNT_WEIGHTS.values()))[0]
    types = sample_shape_types(rng, n)
    rng.shuffle(types)  # the first-drawn (most often frequent) type should not always take the first cell
    cells = sorted(rng.sample(range(4), n))
    half = size / 2
    objects = []
    for shape, cell in zip(types, cells):
        radius = rng.uniform(0.28, 0.42) * half
        margin = radius + size / 48  # at least a pixel from the cell border
        x0, y0 = (cell % 2) * half, (cell // 2) * half
        colour = rng.choice(list(COLOURS))
        rgb = tuple(min(255, max(0, c + rng.randint(-10, 10))) for c in COLOURS[colour])
        objects.append(SceneObject(shape, colour, cell, rng.uniform(x0 + margin, x0 + half - margin),
                                   rng.uniform(y0 + margin, y0 + half - margin), radius, rgb))
    base = rng.randint(12, 36)
    background = tuple(base + rng.randint(-6, 6) for _ in range(3))
    return Scene(image_id, size, background, tuple(objects))


def _outline(shape: str, x: float, y: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape centred at (x, y) whose extent is about 2r."""
    if shape == "square":
        h = 0.82 * r
        return [(x - h, y - h), (x + h, y - h), (x + h, y + h), (x - h, y + h)]
    if shape == "triangle":
        return [(x, y - r), (x + r, y + 0.8 * r), (x - r, y + 0.8 * r)]
    if shape == "diamond":
        return [(x, y - r), (x + 0.7 * r, y), (x, y + r), (x - 0.7 * r, y)]
    if shape == "star":
        pts = []
        for i in range(10):
            rad = r if i % 2 == 0 else 0.45 * r
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((x + rad * math.cos(a), y + rad * math.sin(a)))
        return pts
    if shape == "cross":
        w = 0.33 * r
        return [(x - w, y - r), (x + w, y - r), (x + w, y - w), (x + r, y - w), (x + r, y + w), (x + w, y + w),
                (x + w, y + r), (x - w, y + r), (x - w, y + w), (x - r, y + w), (x - r, y - w), (x - w, y - w)]
    raise ValueError(f"unknown shape {shape!r}")


def draw(scene: Scene, supersample: int = 4) -> Image.Image:
    """Render a scene as an RGB image of ``scene.size`` pixels (drawn ``supersample`` times larger, then
    box-filtered down, so edges are anti-aliased the same way on every machine)."""
    s = supersample
    big = Image.new("RGB", (scene.size * s, scene.size * s), scene.background)
    pen = ImageDraw.Draw(big)
    for o in scene.objects:
        if o.shape == "circle":
            r = 0.95 * o.radius * s
            pen.ellipse([o.x * s - r, o.y * s - r, o.x * s + r, o.y * s + r], fill=o.rgb)
        else:
            pen.polygon(_outline(o.shape, o.x * s, o.y * s, o.radius * s), fill=o.rgb)
    return big.reduce(s)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- statistics
@dataclass
class ShapeStats:
    """Per-type image counts and pairwise co-occurrence counts of a set of scenes (what POPE samples from)."""

    frequency: Counter
    cooccurrence: Counter  # (a, b) -> images holding both, both orders stored

    def to_json(self) -> dict:
        return {"frequency": {s: self.frequency[s] for s in SHAPES},
                "cooccurrence": {a: {b: self.cooccurrence[a, b] for b in SHAPES if b != a} for a in SHAPES}}


def shape_stats(object_lists: Sequence[Sequence[str]]) -> ShapeStats:
    """Statistics of ground-truth object lists (one list of shape types per image)."""
    freq, cooc = Counter(), Counter()
    for objects in object_lists:
        present = set(objects)
        freq.update(present)
        cooc.update((a, b) for a in present for b in present if a != b)
    return ShapeStats(freq, cooc)


def pope_negatives(present: Sequence[str], k: int, strategy: str, stats: ShapeStats,
                   rng: random.Random) -> list[str]:
    """``k`` absent shape types to ask about, per POPE's negative sampling ``strategy``.

    * ``random``: uniformly among the absent types.
    * ``popular``: the ``k`` absent types present in the most images (``stats.frequency``).
    * ``adversarial``: the ``k`` absent types with the highest co-occurrence with the present ones,
      ``sum_p cooc(p, t)`` (POPE ranks per ground-truth object; summing over them is the same for one object).

    Ties break by frequency, then by the order of ``SHAPES``.
    """
    absent = [s for s in SHAPES if s not in present]
    if strategy == "random":
        return rng.sample(absent, k)
    if strategy == "popular":
        def key(s):
            return -stats.frequency[s], SHAPES.index(s)
    elif strategy == "adversarial":
        def key(s):
            return -sum(stats.cooccurrence[p, s] for p in present), -stats.frequency[s], SHAPES.index(s)
    else:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    return sorted(absent, key=key)[:k]


# -------------------------------------------------------------------------------------------------- texts
def _with_article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


class Mention(NamedTuple):
    """A shape as a caption states it (true or not)."""

    colour: str
    shape: str
    position: str
    true: bool = True  # False once corrupted (recoloured or hallucinated): later corruptions leave it alone


def render_caption(mentions: Sequence[Mention], template: int = 0, detailed: bool = False,
                   count: Optional[int] = None) -> str:
    """A caption listing ``mentions`` in order; ``count`` overrides the stated number (a wrong count).

    ``detailed`` adds each shape's grid cell and uses ``DETAILED_TEMPLATE``; otherwise
    ``CAPTION_TEMPLATES[template]``: "There are two shapes: a red circle and a blue square."
    """
    n = len(mentions) if count is None else count
    items = [_with_article(f"{m.colour} {m.shape}") + (f" in the {m.position}" if detailed else "") for m in mentions]
    text = DETAILED_TEMPLATE if detailed else CAPTION_TEMPLATES[template]
    return text.format(be="is" if n == 1 else "are", n=NUMBERS[n], N=NUMBERS[n].capitalize(),
                       noun="shape" if n == 1 else "shapes", items=_join(items))


def caption(scene: Scene, template: int = 0, detailed: bool = False) -> str:
    """The ground-truth caption of a scene."""
    return render_caption(_mentions(scene), template, detailed)


def _mentions(scene: Scene) -> list[Mention]:
    return [Mention(o.colour, o.shape, o.position) for o in scene.objects]


@dataclass
class _Draft:
    """A caption being corrupted: its mentions and, after a wrong-count corruption, the number it states."""

    mentions: list[Mention]
    count: Optional[int] = None

    def fix_count(self, true_n: int, rng: random.Random):
        # a stated count that a later corruption made right again must be made wrong again
        if self.count is not None and self.count == len(self.mentions):
            self.count = _wrong_number(rng, {len(self.mentions), true_n})


def _wrong_number(rng: random.Random, avoid: set) -> int:
    near = [m for a in sorted(avoid) for m in (a - 1, a + 1) if 1 <= m <= 6 and m not in avoid]
    if near and rng.random() < 0.7:
        return rng.choice(sorted(set(near)))
    return rng.choice([m for m in range(1, 7) if m not in avoid])


def _hallucinate(d: _Draft, scene: Scene, rng: random.Random) -> bool:
    stated = {m.shape for m in d.mentions}
    absent = [s for s in SHAPES if s not in stated and s not in scene.shapes]
    if not absent:
        return False
    partners = [PARTNERS[s] for s in scene.shapes if PARTNERS[s] in absent]  # plausible hallucinations first
    shape = rng.choice(partners) if partners and rng.random() < 0.5 else rng.choice(absent)
    used = {m.position for m in d.mentions}
    free = [p for p in POSITIONS if p not in used]
    mention = Mention(rng.choice(list(COLOURS)), shape, rng.choice(free or list(POSITIONS)), False)
    d.mentions.insert(rng.randint(0, len(d.mentions)), mention)
    return True


def _recolour(d: _Draft, scene: Scene, rng: random.Random) -> bool:
    true = [i for i, m in enumerate(d.mentions) if m.true]
    if not true:
        return False
    i = rng.choice(true)
    m = d.mentions[i]
    d.mentions[i] = m._replace(colour=rng.choice([c for c in COLOURS if c != m.colour]), true=False)
    return True


def _drop(d: _Draft, scene: Scene, rng: random.Random) -> bool:
    true = [i for i, m in enumerate(d.mentions) if m.true]
    if len(d.mentions) < 2 or not true:
        return False
    del d.mentions[rng.choice(true)]
    return True


def _miscount(d: _Draft, scene: Scene, rng: random.Random) -> bool:
    if d.count is not None:
        return False
    d.count = _wrong_number(rng, {len(d.mentions), len(scene.objects)})
    return True


CAPTION_CORRUPTIONS: dict[str, Callable[[_Draft, Scene, random.Random], bool]] = {
    "hallucinated_object": _hallucinate,
    "wrong_colour": _recolour,
    "missing_object": _drop,
    "wrong_count": _miscount,
}


def corrupt_caption(scene: Scene, rng: random.Random, errors: int = 1, template: int = 0,
                    detailed: bool = False) -> list[tuple[str, list[str]]]:
    """Captions with 1, 2, ..., ``errors`` errors, each building on the previous: ``[(text, corruptions)]``.

    Corruptions (``CAPTION_CORRUPTIONS``): an extra shape that is not there (often the partner of one that is),
    a wrong colour, a missing shape, a wrong count. Each one touches a mention no earlier one touched.
    """
    d, applied, out = _Draft(_mentions(scene)), [], []
    for _ in range(errors):
        options = [c for c in CAPTION_CORRUPTIONS if c not in applied]
        rng.shuffle(options)
        for name in options:
            if CAPTION_CORRUPTIONS[name](d, scene, rng):
                applied.append(name)
                d.fix_count(len(scene.objects), rng)
                break
        out.append((render_caption(d.mentions, template, detailed, d.count), list(applied)))
    return out


def attribute_scores(errors: int, text: str, objects: int) -> dict:
    """mllm-dpo's five graded attributes (0-4) of a response with ``errors`` errors mentioning ``objects`` shapes.

    helpfulness 4, 3, 1, 0 and correctness 4, 2, 0 for 0, 1, 2, 3+ errors; coherence 4, 4, 3, 3 (one slip
    reads fine, several do not); complexity = shapes mentioned; verbosity = words / 6. Capped to 0-4.
    With mllm-dpo's pair rule (score = helpfulness + correctness + coherence: 12, 9, 4) the correct answer is
    always chosen and only a candidate with errors is rejected.
    """
    def clip(v):
        return max(0, min(4, int(v)))

    return {"helpfulness": clip(4 - errors - errors // 2), "correctness": clip(4 - 2 * errors),
            "coherence": clip(4 - errors // 2), "complexity": clip(objects), "verbosity": clip(len(text.split()) // 6)}


class QA(NamedTuple):
    """One question about a scene with its answer, a wrong answer, and what makes that one wrong."""

    question: str
    answer: str
    wrong: str
    corruption: str
    meta: dict


def _unique_colours(scene: Scene) -> list[str]:
    counts = Counter(o.colour for o in scene.objects)
    return [o.colour for o in scene.objects if counts[o.colour] == 1]


def qa_kinds(scene: Scene) -> list[str]:
    """The question kinds that have one right answer for this scene (``shape`` needs a colour used once)."""
    return ["count", "colour"] + (["shape"] if _unique_colours(scene) else []) + ["position"]


def ask(scene: Scene, kind: str, rng: random.Random, stats: ShapeStats) -> QA:
    """A question of ``kind`` (a key of ``QUESTIONS``) about ``scene``.

    ``yes_no`` is yes or no with equal chance; its negatives are drawn with one of POPE's strategies, picked
    at random, from ``stats``. Wrong answers are plausible: the colour or position of another shape, a
    nearby count, a shape that is there but has another colour.
    """
    template = rng.choice(QUESTIONS[kind])
    objs = scene.objects
    if kind == "count":
        n = len(objs)
        wrong = _wrong_number(rng, {n})
        return QA(template, NUMBERS[n].capitalize() + ".", NUMBERS[wrong].capitalize() + ".", "wrong_count", {})
    if kind == "colour":
        o = rng.choice(objs)
        others = [p.colour for p in objs if p.colour != o.colour]
        wrong = rng.choice(others) if others and rng.random() < 0.5 else rng.choice(
            [c for c in COLOURS if c != o.colour])
        return QA(template.format(shape=o.shape), o.colour.capitalize() + ".", wrong.capitalize() + ".",
                  "wrong_colour", {"shape": o.shape})
    if kind == "shape":
        colour = rng.choice(_unique_colours(scene))
        o = next(p for p in objs if p.colour == colour)
        others = [p.shape for p in objs if p is not o]
        wrong = rng.choice(others) if others and rng.random() < 0.5 else rng.choice(
            [s for s in SHAPES if s != o.shape])
        answer, wrong = (_with_article(s).capitalize() + "." for s in (o.shape, wrong))
        return QA(template.format(colour=colour), answer, wrong, "wrong_shape", {"colour": colour})
    if kind == "position":
        o = rng.choice(objs)
        wrong = rng.choice([p for p in POSITIONS if p != o.position])
        return QA(template.format(shape=o.shape), f"In the {o.position}.", f"In the {wrong}.", "wrong_position",
                  {"shape": o.shape})
    if kind == "yes_no":
        if rng.random() < 0.5:
            shape, label, strategy = rng.choice(objs).shape, "yes", None
        else:
            strategy = rng.choice(STRATEGIES)
            shape, label = pope_negatives(scene.shapes, 1, strategy, stats, rng)[0], "no"
        yes, no = "Yes.", "No."
        answer, wrong = (yes, no) if label == "yes" else (no, yes)
        return QA(template.format(shape=shape), answer, wrong, "flipped_answer",
                  {"shape": shape, "label": label, "negative": strategy})
    raise ValueError(f"unknown question kind {kind!r}")


def _caption_turn(scene: Scene, rng: random.Random) -> tuple[str, str, dict]:
    detailed = rng.random() < DETAILED_SHARE
    template = 0 if detailed else rng.randrange(len(CAPTION_TEMPLATES))
    prompt = rng.choice(DETAILED_PROMPTS if detailed else CAPTION_PROMPTS)
    return prompt, caption(scene, template, detailed), {"detailed": detailed, "template": template}


def _user(text: str, first: bool) -> dict:
    return {"role": "user", "content": f"{IMAGE_TOKEN}\n{text}" if first else text}


def _pick(rng: random.Random, weights: dict) -> str:
    return rng.choices(list(weights), list(weights.values()))[0]


# ------------------------------------------------------------------------------------------------- records
def sft_record(scene: Scene, rng: random.Random, stats: ShapeStats) -> SFTRecord:
    """A conversation about the scene (``SFT_TASKS``): a caption, a question, a yes/no object question, or
    2-3 of those in one multi-turn chat (a caption, if any, first)."""
    task = _pick(rng, SFT_TASKS)
    if task == "caption":
        turns = [_caption_turn(scene, rng)[:2]]
    elif task in ("qa", "yes_no"):
        qa = ask(scene, rng.choice(qa_kinds(scene)) if task == "qa" else "yes_no", rng, stats)
        turns = [(qa.question, qa.answer)]
    else:
        kinds = rng.sample(["caption", *qa_kinds(scene), "yes_no"], rng.choice((2, 3)))
        kinds.sort(key=lambda k: k != "caption")
        turns = [_caption_turn(scene, rng)[:2] if k == "caption" else ask(scene, k, rng, stats)[:2] for k in kinds]
    conversation = []
    for i, (q, a) in enumerate(turns):
        conversation += [_user(q, i == 0), {"role": "assistant", "content": a}]
    return SFTRecord(scene.id, conversation, {"task": task, "scene": scene.to_json()})


def preference_record(scene: Scene, rng: random.Random, stats: ShapeStats) -> PreferenceRecord:
    """chosen = the correct answer, rejected = a corrupted one (``meta["corruption"]`` says how).

    Caption records (``PREFERENCE_TASKS``) carry ``candidates`` = [correct, one error, two errors] (the second
    builds on the first) and their ``scores`` (:func:`attribute_scores`); rejected is the one-error caption,
    the harder pair. Question records get a wrong answer; yes/no records the flipped answer.
    """
    task = _pick(rng, PREFERENCE_TASKS)
    meta = {"task": task, "scene": scene.to_json()}
    if task == "caption":
        prompt, answer, info = _caption_turn(scene, rng)
        wrong = corrupt_caption(scene, rng, 2, info["template"], info["detailed"])
        candidates = [answer] + [text for text, _ in wrong]
        scores = [attribute_scores(0, answer, len(scene.objects))]
        scores += [attribute_scores(len(c), text, len(scene.objects) + c.count("hallucinated_object")
                                    - c.count("missing_object")) for text, c in wrong]
        meta.update(corruption=wrong[0][1][0], corruptions=[[], *[c for _, c in wrong]])
        return PreferenceRecord(scene.id, [_user(prompt, True)], answer, candidates[1], candidates, scores,
                                meta=meta)
    qa = ask(scene, rng.choice(qa_kinds(scene)) if task == "qa" else "yes_no", rng, stats)
    meta.update(corruption=qa.corruption, **qa.meta)
    return PreferenceRecord(scene.id, [_user(qa.question, True)], qa.answer, qa.wrong, meta=meta)


def prompt_record(scene: Scene, rng: Optional[random.Random] = None) -> PromptRecord:
    """A caption prompt with the ground-truth caption and objects; a fixed prompt when ``rng`` is None (test)."""
    if rng is None:
        prompt, answer = CAPTION_TEST_PROMPT, caption(scene)
    else:
        prompt, answer, _ = _caption_turn(scene, rng)
    return PromptRecord(scene.id, [_user(prompt, True)], answer, scene.shapes, {"scene": scene.to_json()})


def pope_questions(scenes: Sequence[Scene], stats: ShapeStats, rng: random.Random,
                   per_image: int = POPE_PER_IMAGE) -> dict[str, list[dict]]:
    """POPE question lists per strategy, in the official layout (``question_id``, ``image``, ``text``, ``label``).

    Each image gets ``k = min(per_image, #present, #absent)`` positives (the same in all three files) and ``k``
    negatives by the file's strategy, alternating yes / no. Question ids are unique across the three files.
    """
    out: dict[str, list[dict]] = {s: [] for s in STRATEGIES}
    for scene in scenes:
        present = scene.shapes
        k = min(per_image, len(present), len(SHAPES) - len(present))
        positives = rng.sample(present, k)
        for strategy in STRATEGIES:
            negatives = pope_negatives(present, k, strategy, stats, rng)
            for pos, neg in zip(positives, negatives):
                for shape, label in ((pos, "yes"), (neg, "no")):
                    out[strategy].append({"image": f"{scene.id}.png",
                                          "text": QUESTIONS["yes_no"][0].format(shape=shape), "label": label})
    ids = itertools.count(1)
    return {s: [{"question_id": next(ids), **q} for q in out[s]] for s in STRATEGIES}


def corpus() -> list[str]:
    """Sentences covering the world's whole vocabulary (prompts, captions, questions, answers, corrupted answers
    and CHAIR synonyms), deterministic; the tiny tokenizer is trained on it. Changing it changes that tokenizer."""
    rng = random.Random("vlalign-shapes/corpus")
    lines = [" ".join(SHAPES), " ".join(COLOURS), " ".join(NUMBERS), ", ".join(POSITIONS),
             *(" ".join(words) for words in CHAIR_SYNONYMS.values()), *CAPTION_PROMPTS, *DETAILED_PROMPTS]
    for kind, templates in QUESTIONS.items():
        for t in templates:
            lines += sorted({t.format(shape=s, colour=c) for s in SHAPES for c in COLOURS})
    lines += [f"{w.capitalize()}." for w in (*NUMBERS[1:], *COLOURS, "yes", "no")]
    lines += [f"{_with_article(s).capitalize()}." for s in SHAPES] + [f"In the {p}." for p in POSITIONS]
    scenes = [sample_scene(rng, f"corpus-{i}") for i in range(300)]
    stats = shape_stats([s.shapes for s in scenes])
    for scene in scenes:
        lines += [t["content"].replace(IMAGE_TOKEN + "\n", "") for t in sft_record(scene, rng, stats).conversation]
        pref = preference_record(scene, rng, stats)
        lines += [pref.prompt[0]["content"].replace(IMAGE_TOKEN + "\n", ""), *(pref.candidates or
                                                                                [pref.chosen, pref.rejected])]
    return lines


# --------------------------------------------------------------------------------------------------- build
def _args(train_images, val_images, test_images, image_size, seed, shard_size) -> dict:
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16 px to draw recognisable shapes, got {image_size}")
    if min(train_images, val_images, test_images) < 0 or shard_size < 1:
        raise ValueError("image counts must be >= 0 and shard_size >= 1")
    return {"train_images": train_images, "val_images": val_images, "test_images": test_images,
            "image_size": image_size, "seed": seed, "shard_size": shard_size}


def _rng(seed: int, split: str, what: str) -> random.Random:
    return random.Random(f"vlalign-shapes/{seed}/{split}/{what}")  # str seeds hash with SHA-512: stable


def _dump(path: str, obj, lines: bool = False):
    with open(path, "w") as f:
        if lines:
            f.writelines(json.dumps(o) + "\n" for o in obj)
        else:
            json.dump(obj, f, indent=1)
            f.write("\n")


def _build_into(root: str, args: dict, progress: bool) -> dict:
    """Write the whole world under ``root`` (an empty directory) and return its manifest."""
    from tqdm import tqdm

    size, shard = args["image_size"], args["shard_size"]
    counts = {"train": args["train_images"], "val": args["val_images"], "test": args["test_images"]}
    scenes = {}
    for split, n in counts.items():
        rng = _rng(args["seed"], split, "scenes")
        scenes[split] = [sample_scene(rng, f"shapes-{split}-{i:06d}", size) for i in range(n)]
    stats = {split: shape_stats([s.shapes for s in sc]) for split, sc in scenes.items()}
    shards: dict[str, list[str]] = {}
    tasks: dict[str, Counter] = {"sft": Counter(), "preference": Counter(), "corruption": Counter()}
    bar = tqdm(total=sum(counts.values()), desc="shapes", unit="img", disable=not progress)

    def writer(kind, split):
        return ShardWriter(os.path.join(root, kind, f"{split}-%06d.tar"), max_count=shard)

    for split in ("train", "val"):
        rng = _rng(args["seed"], split, "text")
        writers = {"sft": writer("sft", split), "preference": writer("preference", split)}
        if split == "train":
            writers["prompts"] = writer("prompts", split)
        for scene in scenes[split]:
            png = png_bytes(draw(scene))
            sft = sft_record(scene, rng, stats[split])
            pref = preference_record(scene, rng, stats[split])
            writers["sft"].write(sft, [png], key=scene.id)
            writers["preference"].write(pref, [png], key=scene.id)
            if "prompts" in writers:
                writers["prompts"].write(prompt_record(scene, rng), [png], key=scene.id)
            tasks["sft"][sft.meta["task"]] += 1
            tasks["preference"][pref.meta["task"]] += 1
            tasks["corruption"][pref.meta["corruption"]] += 1
            bar.update()
        for kind, w in writers.items():
            w.close()
            shards[f"{kind}/{split}"] = [os.path.relpath(p, root) for p in w.paths]

    images_dir = os.path.join(root, "eval", "images")
    os.makedirs(images_dir)
    w = writer("prompts", "test")
    for scene in scenes["test"]:
        png = png_bytes(draw(scene))
        w.write(prompt_record(scene), [png], key=scene.id)
        with open(os.path.join(images_dir, f"{scene.id}.png"), "wb") as f:
            f.write(png)
        bar.update()
    w.close()
    bar.close()
    shards["prompts/test"] = [os.path.relpath(p, root) for p in w.paths]

    pope = pope_questions(scenes["test"], stats["test"], _rng(args["seed"], "test", "pope"))
    eval_files = {f"pope_{s}": f"eval/pope_{s}.jsonl" for s in STRATEGIES}
    eval_files.update(chair_vocab="eval/chair_vocab.json", chair_gt="eval/chair_gt.json",
                      captions_prompts="eval/captions_prompts.jsonl", images="eval/images")
    for s in STRATEGIES:
        _dump(os.path.join(root, eval_files[f"pope_{s}"]), pope[s], lines=True)
    _dump(os.path.join(root, eval_files["chair_vocab"]), CHAIR_SYNONYMS)
    _dump(os.path.join(root, eval_files["chair_gt"]), {s.id: s.shapes for s in scenes["test"]})
    _dump(os.path.join(root, eval_files["captions_prompts"]),
          [{"image_id": s.id, "image": f"{s.id}.png", "text": CAPTION_TEST_PROMPT} for s in scenes["test"]], lines=True)

    records = {key: counts[key.split("/")[1]] for key in shards}
    records.update({f"eval/pope_{s}": len(pope[s]) for s in STRATEGIES}, **{"eval/images": counts["test"]})
    manifest = {
        "generator": GENERATOR, "version": VERSION, "args": args, "counts": records, "shards": shards,
        "eval": eval_files,
        "stats": {"train": stats["train"].to_json(), "test": stats["test"].to_json(),
                  "sft_tasks": dict(sorted(tasks["sft"].items())),
                  "preference_tasks": dict(sorted(tasks["preference"].items())),
                  "preference_corruptions": dict(sorted(tasks["corruption"].items()))},
    }
    _dump(os.path.join(root, "manifest.json"), manifest)
    return manifest


def read_manifest(out_dir: str) -> Optional[dict]:
    """The manifest of a built world, or None when there is none (never built, or not readable)."""
    try:
        with open(os.path.join(out_dir, "manifest.json")) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("generator") == GENERATOR else None


def _complete(manifest: dict, out_dir: str, args: dict) -> bool:
    if manifest.get("version") != VERSION or manifest.get("args") != args:
        return False
    paths = [p for ps in manifest.get("shards", {}).values() for p in ps] + list(manifest.get("eval", {}).values())
    return all(os.path.exists(os.path.join(out_dir, p)) for p in paths)


def _check_replaceable(out_dir: str):
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or (os.listdir(out_dir)
                                                                   and read_manifest(out_dir) is None)):
        raise FileExistsError(f"{out_dir!r} exists and is not a shapes world (no manifest.json from {GENERATOR}); "
                              "refusing to replace it: remove it or choose another directory")


def _disk_bytes(root: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)


def build_shapes(out_dir: str, train_images: int = 5000, val_images: int = 300, test_images: int = 500,
                 image_size: int = 48, seed: int = 0, shard_size: int = 1000, progress: bool = True) -> dict:
    """Build the shapes world under ``out_dir``, replacing a shapes world already there.

    Args:
        out_dir: target directory; it must not exist, be empty, or hold a shapes world (its manifest.json).
        train_images: training images; each gives one sft, one preference and one prompt record.
        val_images: validation images (sft and preference records).
        test_images: held-out images: prompts/test and the POPE / CHAIR files under ``eval/``.
        image_size: image side in pixels.
        seed: everything is a function of it (same seed, same bytes); the splits use independent streams.
        shard_size: samples per tar shard.
        progress: show a progress bar.

    Returns:
        The manifest (``generator``, ``version``, ``args``, ``counts``, ``shards``, ``eval``, ``stats``, with paths
        relative to ``out_dir``) plus ``out_dir`` (absolute), ``seconds`` and ``bytes`` on disk.
    """
    args = _args(train_images, val_images, test_images, image_size, seed, shard_size)
    _check_replaceable(out_dir)
    start = time.perf_counter()
    out_dir = os.path.abspath(out_dir)
    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.building-", dir=parent)  # same filesystem: the rename is atomic
    try:
        os.chmod(tmp, 0o755)
        manifest = _build_into(tmp, args, progress)
        if os.path.exists(out_dir):
            os.rename(out_dir, tmp + ".old")
            os.rename(tmp, out_dir)
            shutil.rmtree(tmp + ".old")
        else:
            os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**manifest, "out_dir": out_dir, "seconds": round(time.perf_counter() - start, 3),
            "bytes": _disk_bytes(out_dir)}


def ensure_shapes(out_dir: str, train_images: int = 5000, val_images: int = 300, test_images: int = 500,
                  image_size: int = 48, seed: int = 0, shard_size: int = 1000, progress: bool = True) -> dict:
    """Build the shapes world unless ``out_dir`` already holds one made by this generator version with these
    arguments and all its files (see :func:`build_shapes` for the arguments).

    Returns the manifest plus ``out_dir`` and ``built`` (whether this call built it).
    """
    args = _args(train_images, val_images, test_images, image_size, seed, shard_size)
    manifest = read_manifest(out_dir)
    if manifest is not None and _complete(manifest, out_dir, args):
        return {**manifest, "out_dir": os.path.abspath(out_dir), "built": False}
    return {**build_shapes(out_dir, **args, progress=progress), "built": True}
