"""Chat template rendering, prompt masking, EOS, image-token expansion and image-safe truncation."""

from vlalign.data.chat import IGNORE, Encoder, image_spans, truncate


def encoder(bb):
    return Encoder(bb.tokenizer, bb.processor.chat_template, bb.num_image_tokens)


CONV = [{"role": "user", "content": "<image>\nDescribe the image."},
        {"role": "assistant", "content": "A red circle."},
        {"role": "user", "content": "What colour is the circle?"},
        {"role": "assistant", "content": "Red."}]


def test_only_assistant_turns_and_eos_are_trained(tiny_processor_backbone):
    bb = tiny_processor_backbone
    enc = encoder(bb)
    ids, labels = enc.conversation(CONV)
    assert len(ids) == len(labels)
    trained = [l for l in labels if l != IGNORE]
    assert bb.tokenizer.decode(trained) == " A red circle.</s> Red.</s>"
    # every trained label is the token at that position
    assert all(l == i for i, l in zip(ids, labels) if l != IGNORE)
    # exactly one image's worth of image tokens, never trained
    assert ids.count(bb.image_token_id) == bb.num_image_tokens == 36
    assert all(l == IGNORE for i, l in zip(ids, labels) if i == bb.image_token_id)
    assert ids[0] == bb.tokenizer.bos_token_id


def test_prompt_plus_response_is_the_conversation_prefix(tiny_processor_backbone):
    enc = encoder(tiny_processor_backbone)
    ids, _ = enc.conversation(CONV[:2])
    p, r = enc.prompt(CONV[:1]), enc.response(CONV[:1], "A red circle.")
    assert p + r == ids[:len(p) + len(r)]
    assert r[-1] == tiny_processor_backbone.tokenizer.eos_token_id


def test_truncation_never_cuts_inside_an_image():
    img, n = 99, 4
    ids = [1, 2] + [img] * n + [3] + [img] * n + [5, 6, 7]
    labels = [IGNORE] * 11 + [5, 6, 7]
    # a cut at 9 would fall inside the second image: the sequence ends before it, one image kept
    out, lab, kept = truncate(ids, labels, 9, img, n)
    assert out == [1, 2] + [img] * n + [3] and kept == 1 and len(lab) == len(out)
    # a cut after both images keeps both
    out, _, kept = truncate(ids, labels, 12, img, n)
    assert kept == 2 and out == ids[:12]
    # short enough: untouched
    assert truncate(ids, labels, 100, img, n) == (ids, labels, None)
    # two adjacent images form one run but are split by their size
    ids2 = [1] + [img] * (2 * n) + [2]
    out, _, kept = truncate(ids2, [IGNORE] * len(ids2), 1 + n + 2, img, n)
    assert kept == 1 and out == [1] + [img] * n
    assert image_spans(ids, img) == [(2, 6), (7, 11)]


def test_text_around_a_placeholder_is_not_glued(tiny_processor_backbone):
    """LLaVA's template renders a turn's images first and joins its texts: text on both sides of ``<image>`` keeps
    the newline the placeholder stood for (Vision-LLM-Alignment's "...doing?\\n<image>\\n### Answer:")."""
    enc = encoder(tiny_processor_backbone)
    text = enc.render([{"role": "user", "content": "What is it doing?\n<image>\n### Answer:"}])
    assert "doing?\n### Answer:" in text and "doing?###" not in text
    assert enc.render([{"role": "user", "content": "<image>\nQ?"}]) == "USER: <image>\nQ? "
