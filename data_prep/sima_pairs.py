"""SIMA preference pairs: two self-generated answers per prompt, judged by the same model as in-context critic.

    python data_prep/sima_pairs.py --model runs/sft/export --prompts "data/shapes/prompts/train-*.tar" \
        --out data/sima/sima-%06d.tar [--max-new-tokens 256 --critic-max-new-tokens 256 --batch-size 16 \
        --seed 0 --limit N]

One process per GPU: give each its own ``--prompts`` shards and ``--out`` pattern.

SIMA (Wang et al., "Enhancing Visual-Language Modality Alignment in Large Vision Language Models via
Self-Improvement", arXiv 2405.15973, https://github.com/si0wang/SIMA):

1. Response self-generation: for each prompt the model being aligned answers twice, once sampled
   (temperature 0.8, top_p 0.9) and once greedy. SIMA numbers them as the critic sees them:
   response 1 = the sample, response 2 = the greedy answer; this script keeps that order.
2. In-context self-critic: the same model sees the image, the question, the ground-truth answer (the prompt
   record's ``answer``) and both responses, with three metrics (accuracy in object description, in depicting
   relationships, in describing attributes) and two worked examples, and ends with
   "The better AI generated response: [[1]]" or "[[2]]" (``critic_prompt``, our own wording).
3. The verdict's response is chosen, the other rejected (``sima_pair``); an unparsable verdict drops the pair
   (``parse_verdict``).

Differences from the seed: identical responses are dropped before the critic runs (they would give a pair with
no preference signal); records without a ground-truth ``answer`` are skipped and counted; newlines inside the
critic's fields become spaces (SIMA deletes them, gluing words together); generation is batched; SIMA's greedy
decoding allows 1024 new tokens (4096 for the critic): raise ``--max-new-tokens`` and
``--critic-max-new-tokens`` to match on a real model.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from typing import Optional, Sequence

from vlalign.data.schema import IMAGE_TOKEN, PreferenceRecord, PromptRecord
from vlalign.data.shards import ShardWriter
from vlalign.generation import (Sampling, View, add_runtime_args, as_prompt, batched, count_samples, generate_views,
                                load_model, model_fingerprint, prompt_encode, read_samples, report)

METRICS = (
    ("Accuracy in object description",
     "are the objects it mentions really in the ground truth, and does it describe them correctly? Mentioning "
     "objects the ground truth does not contain is the worst mistake."),
    ("Accuracy in depicting relationships",
     "are the positions, actions and interactions between objects the ones the ground truth describes?"),
    ("Accuracy in describing attributes",
     "are colours, shapes, sizes, counts and other properties of the objects the ones in the ground truth?"),
)

# Two worked examples (SIMA uses two): one where response 1 wins, one where response 2 wins, so the example
# verdicts do not teach a position.
EXAMPLES = (
    {"question": "What is on the kitchen table?",
     "truth": "A bowl of green apples and a white mug stand on a wooden table.",
     "r1": "There is a bowl of green apples and a white mug on the wooden table.",
     "r2": "There is a bowl of red apples, a white mug and a loaf of bread on the table.",
     "reason": "Response 1 matches the ground truth. Response 2 gives the apples the wrong colour and adds a loaf "
               "of bread that is not there.",
     "verdict": 1},
    {"question": "Describe the scene.",
     "truth": "A black dog sleeps under a bench in a park while a man reads on the bench.",
     "r1": "A man sits under a tree with a black dog on his lap, reading a newspaper.",
     "r2": "A man is reading on a park bench, and a black dog is sleeping beneath it.",
     "reason": "Response 2 describes the dog under the bench as in the ground truth. Response 1 puts the dog on "
               "the man's lap and adds a tree and a newspaper, which misrepresents the relationships.",
     "verdict": 2},
)

VERDICT = re.compile(r"\[\[([^\[\]]*)\]\]")


def _flat(text: str) -> str:
    return " ".join(text.replace(IMAGE_TOKEN, " ").split())


def critic_prompt(question: str, truth: str, response_1: str, response_2: str, examples: int = 2) -> str:
    """The critic's request (the image is prepended by the chat encoding, as for any prompt)."""
    lines = ["You are given an image, a question about it, the ground-truth answer and two AI generated "
             "responses. Compare both responses with the ground truth and decide which one agrees with it better. "
             "Judge them on three points:"]
    lines += [f"{i}. {name}: {what}" for i, (name, what) in enumerate(METRICS, 1)]
    lines.append("Give a short reason, then end with 'The better AI generated response: [[1]]' or "
                 "'The better AI generated response: [[2]]'.")
    for i, ex in enumerate(EXAMPLES[:examples], 1):
        lines += [f"Example {i}:", f"Question: [{ex['question']}]", f"Ground truth: [{ex['truth']}]",
                  f"AI generated response 1: [{ex['r1']}]", f"AI generated response 2: [{ex['r2']}]",
                  f"Reason: {ex['reason']}", f"The better AI generated response: [[{ex['verdict']}]]"]
    lines += ["Your task:", f"Question: [{_flat(question)}]", f"Ground truth: [{_flat(truth)}]",
              f"AI generated response 1: [{_flat(response_1)}]", f"AI generated response 2: [{_flat(response_2)}]"]
    return "\n".join(lines)


def parse_verdict(text: str) -> Optional[int]:
    """1 or 2 from the critic's answer, else None.

    The last ``[[...]]`` marker decides, as in SIMA's ``make_dpo_dataset`` (``split('[[')[-1]``); its content
    must be 1 or 2 (spaces allowed). No marker, or ``[[3]]``, ``[[1 or 2]]``, ``[[]]``: None.
    """
    marks = VERDICT.findall(text or "")
    if not marks:
        return None
    last = marks[-1].strip()
    return int(last) if last in ("1", "2") else None


def same_response(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())


def sima_pair(record: PromptRecord, response_1: str, response_2: str, verdict: Optional[int],
              meta: Optional[dict] = None) -> Optional[PreferenceRecord]:
    """The preference pair a verdict makes: response ``verdict`` chosen, the other rejected; None when no verdict.

    response_1 / response_2: in the order the critic saw them (SIMA: 1 = sampled, 2 = greedy).
    """
    if verdict not in (1, 2):
        return None
    chosen, rejected = (response_1, response_2) if verdict == 1 else (response_2, response_1)
    info = {**record.meta, "method": "sima", "verdict": verdict, **(meta or {})}
    return PreferenceRecord(f"sima-{record.id}", record.prompt, chosen, rejected, meta=info)


def question_of(record: PromptRecord) -> str:
    """The last user turn: the question the critic is told about."""
    return next(t["content"] for t in reversed(record.prompt) if t["role"] == "user")


def run(args) -> dict:
    from tqdm.auto import tqdm

    bb = load_model(args.model, dtype=args.dtype, device=args.device)
    encode = prompt_encode(bb, args.max_length)
    model_name = model_fingerprint(args.model)
    answers = {
        "sample": View(Sampling(args.max_new_tokens, do_sample=True, temperature=args.temperature, top_p=args.top_p)),
        "greedy": View(Sampling(args.max_new_tokens)),
    }
    critic = {"critic": View(Sampling(args.critic_max_new_tokens))}
    skipped, critic_skipped = Counter(), Counter()
    dropped, verdicts, chosen_from = Counter(), Counter(), Counter()
    n_read = kept = 0
    total = args.limit if args.limit is not None else count_samples(args.prompts)
    bar = tqdm(total=total, desc="sima pairs", unit="prompt", disable=not args.progress, dynamic_ncols=True)
    with ShardWriter(args.out, max_count=args.shard_size) as writer:
        for b, chunk in enumerate(batched(read_samples(args.prompts, args.limit, skipped), args.batch_size)):
            n_read += len(chunk)
            with_truth = []
            for record, images in chunk:
                record = as_prompt(record)
                if not (record.answer or "").strip():
                    dropped["no_answer"] += 1
                    continue
                with_truth.append((record, images))
            judged = []
            for record, images, texts in generate_views(bb, with_truth, answers, encode, args.batch_size,
                                                        seed=args.seed * 7919 + b, skipped=skipped, progress=False):
                r1, r2 = texts["sample"], texts["greedy"]
                if not r1.strip() or not r2.strip():
                    dropped["empty_response"] += 1
                elif same_response(r1, r2):
                    dropped["identical"] += 1
                else:
                    prompt = critic_prompt(question_of(record), record.answer, r1, r2, args.examples)
                    judge = PromptRecord(str(len(judged)), [{"role": "user", "content": prompt}])
                    judged.append(((judge, images), (record, r1, r2)))
            critic_out = generate_views(bb, [s for s, _ in judged], critic, encode, args.batch_size,
                                        skipped=critic_skipped, progress=False)
            critiques = {judge.id: texts["critic"] for judge, _, texts in critic_out}
            for (judge, images), (record, r1, r2) in judged:
                if judge.id not in critiques:
                    continue  # the critic prompt could not be encoded (counted in critic_skipped)
                verdict = parse_verdict(critiques[judge.id])
                verdicts[str(verdict) if verdict else "unparsable"] += 1
                pair = sima_pair(record, r1, r2, verdict, {
                    "responses": {"1": "sample", "2": "greedy"}, "critic": critiques[judge.id], "model": model_name,
                    "seed": args.seed, "sampling": {"temperature": args.temperature, "top_p": args.top_p}})
                if pair is None:
                    dropped["unparsable_verdict"] += 1
                    continue
                chosen_from["sample" if verdict == 1 else "greedy"] += 1
                writer.write(pair, images)
                kept += 1
            bar.update(len(chunk))
            bar.set_postfix(kept=kept, dropped=sum(dropped.values()))
    bar.close()
    dropped.update({f"critic_{k}": v for k, v in critic_skipped.items()})
    summary = {"read": n_read, "kept": kept, "dropped": dict(dropped), "skipped": dict(skipped),
               "verdicts": dict(verdicts), "chosen_from": dict(chosen_from), "model": model_name,
               "shards": writer.paths}
    return report(summary, args.summary)


def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="the model being aligned: an export dir or merged checkpoint")
    p.add_argument("--prompts", required=True, help="prompt shards (records need a ground-truth 'answer')")
    p.add_argument("--out", required=True, help="output shard pattern, e.g. out/sima-%%06d.tar")
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length (SIMA: 1024)")
    p.add_argument("--critic-max-new-tokens", type=int, default=256, help="critic length (SIMA: 4096)")
    p.add_argument("--temperature", type=float, default=0.8, help="of the sampled response (SIMA: 0.8)")
    p.add_argument("--top-p", type=float, default=0.9, help="of the sampled response (SIMA: 0.9)")
    p.add_argument("--examples", type=int, default=2, choices=(0, 1, 2), help="in-context examples (SIMA: 2)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=2048, help="longest prompt in tokens (the critic's is long)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled responses")
    p.add_argument("--limit", type=int, default=None, help="read at most this many prompts")
    p.add_argument("--shard-size", type=int, default=1000, help="pairs per output shard")
    add_runtime_args(p, summary=True)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
