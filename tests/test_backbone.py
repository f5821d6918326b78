"""The shared backbone: tiny build, per-part freezing, LoRA only in the language model, log-probs, export."""

import json
import os
import subprocess
import sys

import torch


def _lora_names(bb):
    return [n for n, _ in bb.model.named_parameters() if "lora_" in n]


def test_lora_only_in_chosen_language_layers(make_backbone):
    bb = make_backbone(train_vision=False, train_projector=False,
                       lora={"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"], "layers": [1, 3]})
    names = _lora_names(bb)
    assert names, "no LoRA weights were created"
    assert not any("vision_tower" in n for n in names)   # a plain ["q_proj", "v_proj"] would hit CLIP too
    assert {n.split("layers.")[1].split(".")[0] for n in names} == {"1", "3"}
    assert all(("q_proj" in n or "v_proj" in n) for n in names)
    trainable = {n for n, p in bb.model.named_parameters() if p.requires_grad}
    assert trainable == set(names)                          # everything else frozen


def test_freezing_per_part(make_backbone):
    bb = make_backbone(train_vision=False, train_projector=True, train_language=False)
    d = bb.describe()
    assert d["vision"]["trainable"] == 0 and d["language"]["trainable"] == 0
    assert d["projector"]["trainable"] == d["projector"]["total"] > 0
    bb = make_backbone(train_vision=True, train_projector=False, train_language=True)
    d = bb.describe()
    assert d["vision"]["trainable"] == d["vision"]["total"] and d["projector"]["trainable"] == 0


def test_token_logps_match_full_logits(make_backbone):
    bb = make_backbone()
    bb.model.eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.tensor([[1] + [bb.image_token_id] * bb.num_image_tokens]),
                     torch.randint(10, 300, (1, 12), generator=g)], 1)
    labels = ids.clone()
    labels[:, :30] = -100
    pv = torch.randn(1, 3, 48, 48, generator=g)
    with torch.no_grad():
        h = bb.hidden_states(ids, torch.ones_like(ids), pixel_values=pv)
        got = bb.token_logps(h[:, :-1], labels[:, 1:], chunk=3).logps   # several chunks
        logits = bb.model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv).logits
    ref = logits[:, :-1].log_softmax(-1).gather(2, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    ref = ref * (labels[:, 1:] != -100)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_adapter_disabled_is_the_base_model(make_backbone):
    bb = make_backbone(lora={"r": 4, "alpha": 8})
    for n, p in bb.model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)   # make the adapter matter
    ids = torch.randint(10, 300, (1, 8))
    with torch.no_grad():
        on = bb.hidden_states(ids, torch.ones_like(ids))
        with bb.adapter_disabled():
            off = bb.hidden_states(ids, torch.ones_like(ids))
    assert not torch.allclose(on, off)


LOAD_PLAIN = r"""
import sys, json, torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration
path = sys.argv[1]
model = LlavaForConditionalGeneration.from_pretrained(path, local_files_only=True)
proc = AutoProcessor.from_pretrained(path, local_files_only=True)
conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
text = proc.apply_chat_template(conv, add_generation_prompt=True)
inputs = proc(images=[Image.new("RGB", (48, 48), "red")], text=[text], return_tensors="pt")
ids = torch.tensor([[1, 2, 3]])
out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
logits = model(**inputs).logits
assert "vlalign" not in sys.modules
print(json.dumps({"new_tokens": out.shape[1] - inputs["input_ids"].shape[1], "logit0": float(logits[0, -1, 0])}))
"""


def test_export_merged_loads_with_plain_transformers(make_backbone, tmp_path):
    bb = make_backbone(lora={"r": 4, "alpha": 8})
    for n, p in bb.model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    bb.export_merged(str(tmp_path / "merged"))
    bb.export_adapter(str(tmp_path / "adapter"))
    assert (tmp_path / "merged" / "model.safetensors").exists()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert _lora_names(bb), "exporting must not merge the live model"
    script = tmp_path / "load.py"
    script.write_text(LOAD_PLAIN)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, str(script), str(tmp_path / "merged")], capture_output=True, text=True,
                         env=env, cwd=str(tmp_path), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert 1 <= got["new_tokens"] <= 5
    # the plain model computes what the adapter model computes, through the processor's own pipeline
    from PIL import Image

    proc = bb.processor
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    inputs = proc(images=[Image.new("RGB", (48, 48), "red")], text=[proc.apply_chat_template(conv, add_generation_prompt=True)],
                  return_tensors="pt")
    bb.model.eval()
    with torch.no_grad():
        ours = bb.model(**inputs).logits[0, -1, 0].item()
    assert abs(ours - got["logit0"]) < 1e-4


def test_adapter_export_reloads_as_trainable_adapter(make_backbone, tmp_path):
    bb = make_backbone(lora={"r": 4, "alpha": 8})
    for n, p in bb.model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)
    bb.export_adapter(str(tmp_path / "adapter"))
    again = make_backbone(adapter=str(tmp_path / "adapter"))
    bb.model.eval(), again.model.eval()
    ids = torch.randint(10, 300, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(bb.hidden_states(ids, torch.ones_like(ids)),
                                   again.hidden_states(ids, torch.ones_like(ids)))
    assert any(p.requires_grad for n, p in again.model.named_parameters() if "lora_" in n)


def test_generate_never_emits_the_image_token(make_backbone):
    bb = make_backbone().eval()
    with torch.no_grad():  # make <image> the most likely next token everywhere
        bb.model.lm_head.weight[bb.image_token_id] = bb.model.lm_head.weight.abs().max() * 50
    ids = torch.tensor([[bb.tokenizer.bos_token_id] + bb.tokenizer("Describe", add_special_tokens=False)["input_ids"]])
    new = bb.generate(ids, torch.ones_like(ids), None, max_new_tokens=4)
    assert new.shape[1] >= 1 and bb.image_token_id not in new.tolist()[0]
    assert bb.generate(ids, torch.ones_like(ids), None, max_new_tokens=1, synced_gpus=False).shape == (1, 1)
