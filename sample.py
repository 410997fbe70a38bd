"""
Talk to what you trained: a run's answers, beside its reference's, with DPO's verdict on each.

    python sample.py out/toy-dpo --prompt "The cat sat on the"           # the trained policy's answer
    python sample.py out/toy-dpo --prompt "The cat sat on the" --compare # and the reference's, with rewards
    python sample.py out/dpo --prompts pairs.jsonl --chat --json         # a file's prompts, JSON Lines out
    python sample.py gpt2 --prompt "Hello" --temperature 0.8 --top-k 40 --num-samples 3

RUN is a run folder that train.py or train_toy.py wrote, any folder or file with a
model.safetensors in Hugging Face's GPT-2 layout, or a GPT-2 size (gpt2, gpt2-medium, ...,
downloaded once, as training does). Generation is GPT.generate's (model.py), greedy at
temperature 0, and stops at <|endoftext|>.

--compare asks DPO itself which answer it prefers: the policy's and the reference's answers
are scored as one preference pair by the trained policy against its reference, and each
gets its implicit reward beta (log pi(y|x) - log pi_ref(y|x)) (DPO paper, Eq. 5), with the
run's beta and its sum or mean of log-probs (run.json). A reward above 0 is an answer the
policy made more likely than the reference did.

Read first: model.py (GPT.generate), dpo.py; train.py's "Answers" section (complete and
compare) does the work here.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

import checkpoint
import dpo
import train
from model import GPT, GPT2_MODELS

CHAT = "\n\nHuman: {prompt}\n\nAssistant:"  # HH-RLHF's turns: what a model trained on its pairs expects


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("run", metavar="RUN", help="a run folder, a folder or file with model.safetensors, or a GPT-2 size")
    add("--prompt", action="append", default=[], help="a prompt (give several to ask several)")
    add("--prompts", metavar="FILE", help="a .jsonl (or .json, gzipped or not) whose objects have a \"prompt\"; a "
        "--data file works, each pair's prompt once")
    add("--chat", action="store_true", help="wrap each --prompt as HH-RLHF's \"\\n\\nHuman: ...\\n\\nAssistant:\" "
        "(a prompt that ends so, from --chat or a file, gets an answer that stops before the next \"\\n\\nHuman:\")")
    add("--compare", action="store_true", help="the reference's answer too, and DPO's implicit reward of both")
    add("--max-new-tokens", type=train.positive(int), default=64, help="tokens per answer at most (64)")
    add("--temperature", type=float, default=0.0, help="0 is greedy (the default); higher samples more freely")
    add("--top-k", type=train.positive(int), help="sample among the k most likely tokens only")
    add("--num-samples", type=train.positive(int), default=1, help="answers per prompt (1)")
    add("--seed", type=int, default=0, help="same seed, same text (0)")
    add("--device", choices=["cpu", "cuda", "mps"], help="default: cuda if there is one, else mps, else cpu")
    add("--json", action="store_true", help="one JSON object per answer and line: {prompt, completion}, or with "
        "--compare {prompt, policy, reference, policy_reward, reference_reward}")
    args = parser.parse_args(argv)
    if not (args.prompt or args.prompts):
        parser.error("nothing to answer: give --prompt TEXT or --prompts FILE")
    if not args.temperature >= 0:
        parser.error(f"--temperature must be 0 (greedy) or more, got {args.temperature}")
    if "" in args.prompt:
        parser.error("--prompt is empty: an answer is generated after a prompt; give it some text")
    args.device = args.device or train.default_device()
    return args


def read_prompts(path):
    """Each distinct prompt of a file, in order: a "prompt" field (text, or TRL's messages), or
    the prompt of a pair in any shape train.py reads."""
    def prompt_of(record, where):
        if "chosen" in record:
            prompt = train.pair_texts(record)[0]
        elif isinstance(record.get("prompt"), list):
            prompt = train.dialogue(record["prompt"]) + train.ASSISTANT
        else:
            prompt = record.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("no \"prompt\" text (a prompt, or a pair of chosen and rejected, is needed)")
        return prompt
    prompts = list(dict.fromkeys(checkpoint.read_records(path, prompt_of, "--prompts")))
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompt in the file")
    return prompts


def prompt_ids(enc, prompt):
    try:
        return enc.encode(prompt)
    except ValueError:  # tiktoken refuses special-token text such as "<|endoftext|>" inside a prompt
        raise ValueError(f"the prompt {prompt[:40]!r} holds a special token such as '<|endoftext|>'; remove it") \
            from None


def load(run, device, compare):
    """The policy, and with --compare its reference and the run's loss (run.json); a one-line
    error if RUN holds no model, or records no reference."""
    name = run.removeprefix("openai-community/")
    path = Path(run)
    if not path.exists() and name not in GPT2_MODELS:
        raise FileNotFoundError(f"{run}: no such file or folder, and not a GPT-2 size ({', '.join(GPT2_MODELS)})")
    policy = GPT.from_pretrained(run, device=device)
    if not compare:
        return policy, None, None
    if not path.is_dir() or not (path / "run.json").is_file():
        earlier = path.is_dir() and (path / "metrics.jsonl").is_file()
        raise ValueError(f"--compare: {run} " + ("was saved by an earlier version of this project, which did not keep "
                         "its reference; train it again to compare" if earlier else "is not a run folder of this "
                         "project's, so there is no reference to compare with; give a folder train.py wrote"))
    record = train.run_record(path)
    where = record["reference"]
    reference = GPT.from_pretrained(path / where if where == "reference.safetensors" else where, device=device)
    return policy, dpo.make_reference(reference), dpo.LossConfig(**record["loss"])


def main(argv=None):
    args = parse_args(argv)
    try:
        enc = checkpoint.load_gpt2_encoding()
        prompts = [CHAT.format(prompt=p) if args.chat else p for p in args.prompt]
        prompts += read_prompts(args.prompts) if args.prompts else []
        policy, reference, loss = load(args.run, torch.device(args.device), args.compare)
        context = policy.config.block_size
        for prompt in prompts:
            n = len(prompt_ids(enc, prompt))
            if n + args.max_new_tokens + 1 > context:  # + <|endoftext|>, which --compare scores with the answer
                raise ValueError(f"a prompt of {n} tokens and --max-new-tokens {args.max_new_tokens} do not fit the "
                                 f"model's context of {context} tokens; shorten it or lower --max-new-tokens: "
                                 f"{prompt[:40]!r}...")
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    num_samples=args.num_samples, seed=args.seed)
    for prompt in prompts:
        if args.compare:
            records = train.compare(policy, reference, enc, prompt, loss, **sampling)
        else:
            records = [{"prompt": prompt, "completion": enc.decode(ids)}
                       for ids in train.complete(policy, enc, prompt, **sampling)]
        for record in records:
            if args.json:
                print(json.dumps(record, ensure_ascii=False))
            elif args.compare:
                train.print_comparison(record)
            else:
                print(f"{record['prompt']!r} -> {record['completion']!r}")


if __name__ == "__main__":
    main()
