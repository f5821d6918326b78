"""Chat templates, tokenisation with prompt masking, and truncation that never cuts through image tokens.

The model's own chat template (the processor's, a Jinja string) renders a conversation; we then tokenise the
whole text once with character offsets and mark as trainable exactly the tokens inside assistant turns, followed
by an EOS token (LLaVA-1.5's template ends assistant turns with a space, not ``</s>``; training must still
teach the model to stop). Each ``<image>`` placeholder becomes ``image_tokens`` copies of the image token id,
which the backbone replaces with that image's features.

Labels follow the transformers convention: ``labels[t]`` is the token at position t when it is trained on,
``-100`` otherwise; the shift (token t predicted from position t - 1) happens when log-probs are computed.
"""

from __future__ import annotations

from dataclasses import dataclass

from .schema import IMAGE_TOKEN, Message

IGNORE = -100

# LLaVA-1.5's conversation format ("USER: <image>\nQ ASSISTANT: A USER: ..."), for structured content
# ([{"type": "image"}, {"type": "text", "text": ...}]). Images come first in a turn, as in llava-hf's template.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{{ ' ' }}"
    "{% else %}{{ message['role'].upper() + ': ' }}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{{ ' ' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
TINY_CHAT_TEMPLATE = LLAVA_CHAT_TEMPLATE


class TokenizeError(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def structured(messages: list[Message]) -> list[dict]:
    """Schema messages (text with ``<image>`` placeholders) -> chat-template content parts, in order."""
    out = []
    for m in messages:
        parts = []
        pieces = m["content"].split(IMAGE_TOKEN)
        for i, piece in enumerate(pieces):
            if i:
                parts.append({"type": "image"})
            piece = piece.strip("\n") if i or IMAGE_TOKEN in m["content"] else piece
            if piece and any(p.strip("\n") for p in pieces[i + 1:]):
                # text follows after an image: end this piece with the newline the placeholder stood for, so
                # templates that render images first and join the texts ("Q?" + "### Answer:") do not glue them
                piece += "\n"
            if piece:
                parts.append({"type": "text", "text": piece})
        out.append({"role": m["role"], "content": parts})
    return out


@dataclass
class Encoder:
    """Turns conversations into token ids with the model's template.

    Args:
        tokenizer: a fast tokenizer (offsets are needed) with ``<image>`` as a single special token.
        chat_template: the Jinja template (the processor's).
        image_tokens: token positions per image (e.g. 576 for LLaVA-1.5 at 336 px; 36 for the tiny default).
    """

    tokenizer: object
    chat_template: str
    image_tokens: int

    def __post_init__(self):
        self.image_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.eos_id = self.tokenizer.eos_token_id

    def render(self, messages: list[Message], add_generation_prompt: bool = False) -> str:
        return self.tokenizer.apply_chat_template(structured(messages), chat_template=self.chat_template,
                                                  tokenize=False, add_generation_prompt=add_generation_prompt)

    def _ids_offsets(self, text: str):
        enc = self.tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
        return enc["input_ids"], enc["offset_mapping"]

    def _expand(self, ids: list[int], labels: list[int]):
        out_ids, out_labels = [], []
        for i, l in zip(ids, labels):
            if i == self.image_id:
                out_ids += [i] * self.image_tokens
                out_labels += [IGNORE] * self.image_tokens
            else:
                out_ids.append(i)
                out_labels.append(l)
        return out_ids, out_labels

    def conversation(self, messages: list[Message]) -> tuple[list[int], list[int]]:
        """Token ids and labels of a whole conversation; every assistant turn (plus EOS) is trained on."""
        full = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = len(self.render(messages[:i], add_generation_prompt=True))
            upto = self.render(messages[:i + 1])
            if not full.startswith(upto):
                raise TokenizeError("template", "the chat template does not render conversations incrementally")
            spans.append((start, start + len(upto[start:].rstrip())))
        ids, offsets = self._ids_offsets(full)
        inside = [any(s >= a and e <= b for a, b in spans) and e > s for s, e in offsets]
        last_of_turn = set()
        for a, b in spans:
            idx = [j for j, (s, e) in enumerate(offsets) if s >= a and e <= b and e > s]
            if not idx:
                raise TokenizeError("no_target", "an assistant turn is empty")
            last_of_turn.add(idx[-1])
        out_ids, labels = [], []
        for j, tok in enumerate(ids):
            out_ids.append(tok)
            labels.append(tok if inside[j] else IGNORE)
            if j in last_of_turn and tok != self.eos_id:  # teach the model to stop after each answer
                out_ids.append(self.eos_id)
                labels.append(self.eos_id)
        if not any(l != IGNORE for l in labels):
            raise TokenizeError("no_target", "no assistant tokens to train on")
        return self._expand(out_ids, labels)

    def prompt(self, messages: list[Message]) -> list[int]:
        """Token ids of a prompt ending with the generation cue (``ASSISTANT:``), image tokens expanded."""
        ids, _ = self._ids_offsets(self.render(messages, add_generation_prompt=True))
        return self._expand(ids, ids)[0]

    def response(self, messages: list[Message], response: str) -> list[int]:
        """Token ids of ``response`` (plus EOS) as the model sees it after ``prompt(messages)``."""
        prompt_text = self.render(messages, add_generation_prompt=True)
        full = self.render(messages + [{"role": "assistant", "content": response}]).rstrip()
        if not full.startswith(prompt_text):
            raise TokenizeError("template", "the chat template does not render the prompt as a prefix")
        ids, offsets = self._ids_offsets(full)
        cut = len(prompt_text)
        resp = [t for t, (s, e) in zip(ids, offsets) if s >= cut and e > s]
        if any(s < cut < e for s, e in offsets):
            raise TokenizeError("boundary", "a token spans the prompt/response boundary")
        if not resp:
            raise TokenizeError("no_target", "empty response")
        if resp[-1] != self.eos_id:
            resp.append(self.eos_id)
        return resp


def image_spans(ids: list[int], image_id: int) -> list[tuple[int, int]]:
    """[start, end) of each run of image tokens."""
    spans, start = [], None
    for i, t in enumerate(ids + [None]):
        if t == image_id and start is None:
            start = i
        elif t != image_id and start is not None:
            spans.append((start, i))
            start = None
    return spans


def truncate(ids: list[int], labels: list[int], max_length: int, image_id: int, image_tokens: int):
    """Cut a sequence to ``max_length`` without ever cutting through an image.

    If the cut would fall inside an image's tokens, the sequence ends before that image instead. Returns
    ``(ids, labels, images_kept)``; the caller drops the images past ``images_kept``. Consecutive images are
    split by their token count (``image_tokens``) since their runs touch.
    """
    if len(ids) <= max_length:
        return ids, labels, None
    cut = max_length
    kept = 0
    for s, e in image_spans(ids, image_id):
        for a in range(s, e, image_tokens):
            if a + image_tokens <= cut:
                kept += 1
            elif a < cut:
                cut = a
    return ids[:cut], labels[:cut], kept
