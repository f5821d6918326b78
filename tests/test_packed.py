"""The packed shared-prefix layout gives the same per-response log-probs as separate plain forwards."""

import pytest
import torch

from vlalign.data.collate import PairExample, collate_pairs, packed_attention_mask
from vlalign.logps import pair_logps


def _examples(bb, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = bb.image_token_id
    n = bb.num_image_tokens
    vocab = 300  # ordinary tokens only
    out = []
    for prompt_len, lens in [(5, (3, 7)), (9, (6, 2)), (3, (1, 4))]:
        prompt = [bb.tokenizer.bos_token_id] + [img] * n + torch.randint(10, vocab, (prompt_len,), generator=g).tolist()
        responses = [torch.randint(10, vocab, (l,), generator=g).tolist() for l in lens]
        pv = torch.randn(1, 3, 48, 48, generator=g)
        out.append(PairExample(prompt, responses, pv, None, f"ex{len(out)}"))
    return out


def _separate_forwards(bb, examples):
    """The oracle: every [prompt | response] on its own through the plain HF LLaVA forward."""
    sums = []
    for e in examples:
        for r in e.responses:
            ids = torch.tensor([e.prompt + r])
            logits = bb.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=e.pixel_values).logits
            lp = logits[0, len(e.prompt) - 1:-1].float().log_softmax(-1)
            sums.append(lp.gather(1, torch.tensor(r)[:, None]).sum())
    return torch.stack(sums)


@pytest.mark.parametrize("layout,side,attn", [("plain", "right", "sdpa"), ("plain", "left", "sdpa"),
                                              ("packed", "right", "sdpa"), ("packed", "left", "sdpa"),
                                              ("packed", "right", "eager")])
def test_layouts_match_separate_forwards(make_backbone, layout, side, attn):
    torch.manual_seed(0)
    bb = make_backbone(attn_implementation=attn)
    bb.model.eval()
    examples = _examples(bb)
    batch = collate_pairs(examples, bb.tokenizer.pad_token_id, layout=layout, padding_side=side)
    with torch.no_grad():
        expected = _separate_forwards(bb, examples)
        out = pair_logps(bb, batch)
    got = out.sum.reshape(-1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    tokens = torch.tensor([len(r) for e in examples for r in e.responses], dtype=torch.float32)
    torch.testing.assert_close(out.mean.reshape(-1), expected / tokens, rtol=1e-5, atol=1e-5)
    assert out.tokens.reshape(-1).tolist() == tokens.tolist()


def test_packed_mask_keeps_responses_apart():
    seg = torch.tensor([[0, 0, 1, 1, 2, 2, -1]])
    m = packed_attention_mask(seg)[0, 0]
    assert m[2, :2].all() and m[2, 2] and not m[2, 3]          # response 1 sees the prompt and itself, causally
    assert m[4, :2].all() and not m[4, 2:4].any() and m[4, 4]   # response 2 never sees response 1
    assert m[6].tolist() == [False] * 6 + [True]                # padding attends to itself only
