"""The sample schema: the contract between ``data_prep/`` (which writes shards) and training (which reads them).

A shard is a WebDataset tar file. One sample is a group of members sharing a key ``KEY``:

    KEY.json            the record below (UTF-8 JSON object)
    KEY.png | KEY.jpg   the image, when the record has one image
    KEY.0.png, KEY.1.jpg, ...  the images, in order, when it has several

Only ``json`` and the image extensions in ``IMAGE_EXTENSIONS`` are ever decoded; any other member
(``.pyd``, ``.pickle``, ...) is ignored unread, so a shard from the internet cannot run code.

Every record has ``"kind"`` and ``"id"``; ``"meta"`` (a free-form object) is carried along untouched.
The JSON is UTF-8 without lone surrogates, nests at most ``MAX_JSON_DEPTH`` levels and holds only finite numbers
(no ``NaN`` / ``Infinity``); a preference's chosen and rejected differ (``loads_record`` refuses anything else).
Text uses the placeholder ``<image>`` where an image goes; a turn or prompt that mentions no ``<image>``
while the record has images gets them prepended to its first user turn, in order.

kind = "sft"  (supervised fine-tuning: images + a multi-turn conversation)
    {"kind": "sft", "id": "shapes-000001",
     "conversation": [{"role": "user", "content": "<image>\\nWhat shapes are there?"},
                      {"role": "assistant", "content": "A red circle."},
                      {"role": "user", "content": "What colour is the circle?"},
                      {"role": "assistant", "content": "Red."}]}
    Roles are "system", "user", "assistant"; every assistant turn is trained on, nothing else is.

kind = "preference"  (DPO, reward model)
    {"kind": "preference", "id": "...",
     "prompt": "<image>\\nDescribe the image."          # or a list of turns ending with a user turn
     "chosen": "A red circle.", "rejected": "A red circle and a blue star.",
     # optional, all of them:
     "candidates": ["best", "second", ..., "worst"],   # k >= 2 ranked responses, best first;
                                                       # when given, chosen/rejected may be omitted and
                                                       # default to candidates[0] / candidates[-1]
     "scores": [{"helpfulness": 4, "correctness": 3, ...}, ...],   # one object per candidate
     "ref_logps": {"model": "a name or hash of the reference", "chosen": {"sum": -12.3, "mean": -1.1,
                   "tokens": 11}, "rejected": {...}, "candidates": [{...}, ...]}
    }

kind = "unpaired"  (KTO: one response to a prompt, marked desirable or undesirable; TRL's unpaired layout)
    {"kind": "unpaired", "id": "...", "prompt": "<image>\\nDescribe the image.",   # or a list of turns
     "completion": "A red circle.", "label": true}      # true: desirable, false: undesirable
    KTO also reads ``preference`` records, as two unpaired examples (chosen desirable, rejected undesirable).

kind = "prompt"  (PPO rollouts, generation, evaluation)
    {"kind": "prompt", "id": "...", "prompt": "<image>\\nDescribe the image.",
     "answer": "optional reference answer", "objects": ["optional", "ground-truth", "objects"]}

The dataclasses below parse and validate records (``parse_record``) and turn them back into JSON
(``to_json``); the error messages say which field is wrong, and the reader adds the shard and key.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Union

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")
IMAGE_TOKEN = "<image>"
ROLES = ("system", "user", "assistant")


MAX_JSON_DEPTH = 64
"""Deepest nesting of objects and lists a record may have (the schema itself needs 4: record, ``ref_logps``,
``candidates``, one log-prob; ``meta`` is free-form). Bounds the reader's work on hostile input."""

_SURROGATES = re.compile("[\ud800-\udfff]")


class RecordError(ValueError):
    """A record that does not follow the schema; the message names the field.

    ``reason`` is the short tag the data stream counts it under: ``"bad_json"`` (not UTF-8 JSON, lone surrogate,
    nesting deeper than ``MAX_JSON_DEPTH``), ``"non_finite"`` (NaN, Infinity, a number that overflows a float),
    ``"identical_pair"`` (chosen equal to rejected, or a repeated ranked candidate), ``"image_tokens"`` (``<image>``
    placeholders that do not match the images) and ``"bad_record"`` (any other schema rule).
    """

    def __init__(self, message: str, reason: str = "bad_record"):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # keep the reason through pickling (DataLoader workers)
        return type(self), (str(self), self.reason)


Message = dict  # {"role": str, "content": str}


def _check_messages(turns: Any, what: str, must_end_with: str | None) -> list[Message]:
    if isinstance(turns, str):
        turns = [{"role": "user", "content": turns}]
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"{what} must be a non-empty string or list of turns")
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict) or t.get("role") not in ROLES or not isinstance(t.get("content"), str):
            raise RecordError(f"{what}[{i}] must be {{'role': one of {ROLES}, 'content': str}}, got {t!r:.120}")
        out.append({"role": t["role"], "content": t["content"]})
    if must_end_with and out[-1]["role"] != must_end_with:
        raise RecordError(f"{what} must end with a {must_end_with} turn, ends with {out[-1]['role']}")
    return out


def _check_text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RecordError(f"'{name}' must be a non-empty string, got {value!r:.80}")
    return value


@dataclass
class LogProb:
    """A response's log-probability under some model: summed, per-token mean and token count."""

    sum: float
    mean: float
    tokens: int

    @classmethod
    def parse(cls, d: Any, name: str) -> "LogProb":
        try:
            return cls(float(d["sum"]), float(d["mean"]), int(d["tokens"]))
        except (TypeError, KeyError, ValueError) as e:
            raise RecordError(f"'{name}' must be {{'sum', 'mean', 'tokens'}}, got {d!r:.120}") from e

    def to_json(self) -> dict:
        return {"sum": self.sum, "mean": self.mean, "tokens": self.tokens}


@dataclass
class SFTRecord:
    id: str
    conversation: list[Message]
    meta: dict = field(default_factory=dict)
    kind: str = "sft"

    def to_json(self) -> dict:
        return {"kind": "sft", "id": self.id, "conversation": self.conversation, "meta": self.meta}


@dataclass
class PreferenceRecord:
    id: str
    prompt: list[Message]
    chosen: str
    rejected: str
    candidates: list[str] | None = None
    scores: list[dict] | None = None
    ref_logps: dict | None = None  # {"model": str, "chosen": LogProb, "rejected": LogProb, "candidates": [LogProb]}
    meta: dict = field(default_factory=dict)
    kind: str = "preference"

    def to_json(self) -> dict:
        d: dict[str, Any] = {"kind": "preference", "id": self.id, "prompt": self.prompt,
                             "chosen": self.chosen, "rejected": self.rejected, "meta": self.meta}
        if self.candidates is not None:
            d["candidates"] = self.candidates
        if self.scores is not None:
            d["scores"] = self.scores
        if self.ref_logps is not None:
            as_json = lambda v: v.to_json() if isinstance(v, LogProb) else v  # noqa: E731
            d["ref_logps"] = {k: ([as_json(c) for c in v] if isinstance(v, list) else as_json(v))
                              for k, v in self.ref_logps.items()}
        return d


@dataclass
class PromptRecord:
    id: str
    prompt: list[Message]
    answer: str | None = None
    objects: list[str] | None = None
    meta: dict = field(default_factory=dict)
    kind: str = "prompt"

    def to_json(self) -> dict:
        d: dict[str, Any] = {"kind": "prompt", "id": self.id, "prompt": self.prompt, "meta": self.meta}
        if self.answer is not None:
            d["answer"] = self.answer
        if self.objects is not None:
            d["objects"] = self.objects
        return d


@dataclass
class UnpairedRecord:
    id: str
    prompt: list[Message]
    completion: str
    label: bool
    meta: dict = field(default_factory=dict)
    kind: str = "unpaired"

    def to_json(self) -> dict:
        return {"kind": "unpaired", "id": self.id, "prompt": self.prompt, "completion": self.completion,
                "label": self.label, "meta": self.meta}


Record = Union[SFTRecord, PreferenceRecord, UnpairedRecord, PromptRecord]


def parse_record(obj: Any) -> Record:
    """Validate a decoded JSON object and return the matching record; raises ``RecordError``."""
    if not isinstance(obj, dict):
        raise RecordError(f"a record must be a JSON object, got {type(obj).__name__}")
    kind, rid = obj.get("kind"), obj.get("id")
    if not isinstance(rid, (str, int)):
        raise RecordError("'id' is missing")
    rid = str(rid)
    meta = obj.get("meta") or {}
    if not isinstance(meta, dict):
        raise RecordError("'meta' must be an object")
    if kind == "sft":
        conv = _check_messages(obj.get("conversation"), "conversation", None)
        if not any(t["role"] == "assistant" for t in conv):
            raise RecordError("conversation has no assistant turn to train on")
        return SFTRecord(rid, conv, meta)
    if kind == "preference":
        prompt = _check_messages(obj.get("prompt"), "prompt", "user")
        cands = obj.get("candidates")
        if cands is not None:
            if not isinstance(cands, list) or len(cands) < 2:
                raise RecordError("'candidates' must be a list of at least 2 responses, best first")
            cands = [_check_text(c, f"candidates[{i}]") for i, c in enumerate(cands)]
        chosen = obj.get("chosen", cands[0] if cands else None)
        rejected = obj.get("rejected", cands[-1] if cands else None)
        chosen, rejected = _check_text(chosen, "chosen"), _check_text(rejected, "rejected")
        if chosen.strip() == rejected.strip():
            raise RecordError("'chosen' and 'rejected' are the same text: the pair teaches nothing",
                              "identical_pair")
        if cands is not None and len({c.strip() for c in cands}) < len(cands):
            raise RecordError("'candidates' repeats a response: a ranking of identical texts teaches nothing",
                              "identical_pair")
        scores = obj.get("scores")
        if scores is not None:
            if not isinstance(scores, list) or not all(isinstance(s, dict) for s in scores):
                raise RecordError("'scores' must be a list of objects, one per candidate")
            if cands is not None and len(scores) != len(cands):
                raise RecordError(f"'scores' has {len(scores)} entries for {len(cands)} candidates")
        ref = obj.get("ref_logps")
        if ref is not None:
            if not isinstance(ref, dict):
                raise RecordError("'ref_logps' must be an object")
            parsed: dict[str, Any] = {"model": str(ref.get("model", ""))}
            for side in ("chosen", "rejected"):
                if side in ref:
                    parsed[side] = LogProb.parse(ref[side], f"ref_logps.{side}")
            if "candidates" in ref:
                parsed["candidates"] = [LogProb.parse(c, f"ref_logps.candidates[{i}]")
                                        for i, c in enumerate(ref["candidates"])]
            ref = parsed
        return PreferenceRecord(rid, prompt, chosen, rejected, cands, scores, ref, meta)
    if kind == "unpaired":
        prompt = _check_messages(obj.get("prompt"), "prompt", "user")
        completion = _check_text(obj.get("completion"), "completion")
        label = obj.get("label")
        if not isinstance(label, bool):
            raise RecordError(f"'label' must be true (desirable) or false (undesirable), got {label!r:.40}")
        return UnpairedRecord(rid, prompt, completion, label, meta)
    if kind == "prompt":
        prompt = _check_messages(obj.get("prompt"), "prompt", "user")
        answer = obj.get("answer")
        if answer is not None and not isinstance(answer, str):
            raise RecordError("'answer' must be a string")
        objects = obj.get("objects")
        if objects is not None and (not isinstance(objects, list) or not all(isinstance(o, str) for o in objects)):
            raise RecordError("'objects' must be a list of strings")
        return PromptRecord(rid, prompt, answer, objects, meta)
    raise RecordError(f"'kind' must be one of 'sft', 'preference', 'unpaired', 'prompt', got {kind!r}")


def _refuse_constant(name: str):
    raise RecordError(f"{name} is not a number a record may hold", "non_finite")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise RecordError(f"the number {text[:40]} overflows a float", "non_finite")
    return value


def _finite_int(text: str) -> int:
    value = int(text)  # over 4300 digits: ValueError (Python's int limit), reported as bad_json
    if abs(value) > sys.float_info.max:
        raise RecordError(f"the integer {text[:40]}... overflows a float", "non_finite")
    return value


def check_json_value(obj: Any) -> None:
    """Refuse what a record's JSON may not hold; raises ``RecordError``.

    Nesting deeper than ``MAX_JSON_DEPTH``, strings (keys too) with a lone UTF-16 surrogate (which
    ``"\\ud800"`` escapes produce and UTF-8 cannot encode), and non-finite floats (NaN, +-inf). Walks with an
    explicit stack: no recursion limit to hit on deep input.
    """
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise RecordError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels", "bad_json")
            items = value.items() if isinstance(value, dict) else ((None, v) for v in value)
            for k, v in items:
                if isinstance(k, str) and _SURROGATES.search(k):
                    raise RecordError(f"the key {k!r:.60} holds a lone UTF-16 surrogate", "bad_json")
                stack.append((v, depth + 1))
        elif isinstance(value, str):
            if _SURROGATES.search(value):
                raise RecordError(f"the text {value!r:.60} holds a lone UTF-16 surrogate", "bad_json")
        elif isinstance(value, float) and not math.isfinite(value):
            raise RecordError(f"the number {value} is not finite", "non_finite")


def loads_record(data: bytes | str) -> Record:
    """Parse and validate a record from the bytes of a ``KEY.json`` member; raises ``RecordError``.

    The bytes must be UTF-8 (no BOM, no encoded surrogates), the JSON within ``MAX_JSON_DEPTH`` levels, without
    lone surrogates (also from ``\\ud800`` escapes), and its numbers finite: ``NaN`` / ``Infinity`` and numbers that
    overflow a float (``1e999``) are refused rather than read as NaN / inf.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise RecordError(f"not UTF-8 text: {e}", "bad_json") from e
    try:
        obj = json.loads(data, parse_constant=_refuse_constant, parse_float=_finite_float, parse_int=_finite_int)
    except RecursionError as e:  # json's C parser gives up at ~1000 levels: far past MAX_JSON_DEPTH anyway
        raise RecordError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels", "bad_json") from e
    except ValueError as e:  # JSONDecodeError, and int() past Python's digit limit
        if isinstance(e, RecordError):
            raise
        raise RecordError(f"broken JSON: {e}", "bad_json") from e
    check_json_value(obj)
    return parse_record(obj)


def with_images(turns: list[Message], n_images: int) -> list[Message]:
    """Make the ``<image>`` placeholders in ``turns`` match ``n_images``.

    A conversation that already has exactly ``n_images`` placeholders is returned as is; one with none gets
    them prepended to its first user turn (LLaVA's layout, ``"<image>\\n" + text``); any other count is an error.
    """
    count = sum(t["content"].count(IMAGE_TOKEN) for t in turns)
    if count == n_images:
        return turns
    if count == 0:
        out = [dict(t) for t in turns]
        for t in out:
            if t["role"] == "user":
                t["content"] = (IMAGE_TOKEN + "\n") * n_images + t["content"]
                return out
    raise RecordError(f"the text has {count} '{IMAGE_TOKEN}' placeholders for {n_images} images", "image_tokens")
