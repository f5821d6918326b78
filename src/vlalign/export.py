"""Export any checkpoint of a run (mid-training or last) as a plain transformers LLaVA and, with LoRA, its adapter.

    python -m vlalign.export --config runs/dpo/config.yaml --ckpt runs/dpo/checkpoints/last.ckpt --out DIR

writes ``DIR/merged`` (LoRA merged in; loads with ``LlavaForConditionalGeneration.from_pretrained`` and the 5.x and
4.x processor / tokenizer loaders), ``DIR/adapter`` (peft format, with LoRA) and whatever the algorithm's own
export adds (the reward model's value head), exactly as the end of ``fit`` does (``AlignModule.export``), each
directory written atomically.

How. A checkpoint holds the trainable weights only (``checkpoint.keep_trainable``); the rest is rebuilt from the
run's ``config.yaml`` (LightningCLI saves it in the run directory): its ``model`` section is instantiated (the same
class and arguments, the same local checkpoint or seeded tiny initialisation), built, and the checkpoint's
``state_dict`` loaded over it (``torch.load(weights_only=True)``; not strict, as in training, but every trainable
weight must be in it). One process, on the CPU.

A DeepSpeed checkpoint (a directory of per-rank shards) is refused: Lightning's
``convert_zero_checkpoint_to_fp32_state_dict`` unpickles DeepSpeed's optimizer files (``weights_only=False``), so
this tool does not run it; run it yourself on a checkpoint you wrote, then pass the single file it writes.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import torch


def build_module(config_path: str):
    """The run's LightningModule from its saved ``config.yaml`` (the ``model`` section only), built."""
    import yaml
    from jsonargparse import ArgumentParser

    from .module import AlignModule

    with open(config_path, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise ValueError(f"--config {config_path}: no 'model' section (expected the config.yaml LightningCLI saves in "
                         "the run directory, e.g. runs/dpo/config.yaml)")
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(AlignModule, "model", required=True)
    cfg = parser.parse_object({"model": raw["model"]})
    module = parser.instantiate_classes(cfg).model
    module.configure_model()
    return module


def load_trainable(module, ckpt_path: str) -> int:
    """Load a Lightning checkpoint's weights into ``module``; returns how many tensors were loaded.

    Refuses a DeepSpeed directory, an unknown key (a checkpoint of another model), and a checkpoint that lacks one of
    the module's trainable weights (a config that does not match the checkpoint: other LoRA settings, say).
    """
    if os.path.isdir(ckpt_path):
        raise ValueError(
            f"--ckpt {ckpt_path} is a directory: a DeepSpeed checkpoint (per-rank shards). Consolidate it first with "
            "Lightning's convert_zero_checkpoint_to_fp32_state_dict (lightning.pytorch.utilities.deepspeed; it "
            "unpickles DeepSpeed's files, so only on a checkpoint you wrote) into one file, and pass that file")
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"--ckpt {ckpt_path}: no such file")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"--ckpt {ckpt_path}: no 'state_dict' (not a Lightning checkpoint)")
    result = module.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"--ckpt {ckpt_path} holds weights this config's model does not have "
                       f"({', '.join(result.unexpected_keys[:5])}): is --config the run's own config.yaml?")
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    lacking = sorted(trainable & set(result.missing_keys))
    if lacking:
        raise ValueError(f"--ckpt {ckpt_path} lacks {len(lacking)} trainable weight(s) of this config's model "
                       f"({', '.join(lacking[:5])}): is --config the run's own config.yaml?")
    return len(state)


def export_checkpoint(config_path: str, ckpt_path: str, out: str) -> list[str]:
    """Rebuild the run's module, load the checkpoint, export it to ``out``; returns the directory's entries."""
    import lightning as L

    module = build_module(config_path)
    load_trainable(module, ckpt_path)
    module.eval()
    # the export paths ask the trainer which rank writes; one CPU process is rank 0
    module.trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                               enable_progress_bar=False, enable_model_summary=False)
    module.export(out)
    return sorted(os.listdir(out))


def main(argv: Optional[list[str]] = None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="the run's config.yaml (saved by LightningCLI in the run dir)")
    ap.add_argument("--ckpt", required=True, help="a checkpoint of that run (runs/<name>/checkpoints/*.ckpt)")
    ap.add_argument("--out", required=True, help="export directory (gets merged/ and, with LoRA, adapter/)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        entries = export_checkpoint(args.config, args.ckpt, args.out)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(f"exported {args.ckpt} to {args.out}: {', '.join(entries)}")


if __name__ == "__main__":
    main()
