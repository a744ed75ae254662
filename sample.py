"""
Generate text: the Euler ODE of an FLM checkpoint (METHOD.md 4), the flow map of an FMLM checkpoint (METHOD.md 7).

    python sample.py --steps 1  # one forward pass of the distilled model
    python sample.py --ckpt out/flm-ptb/ckpt.pt --steps 256  # the FLM's ODE, 256 Euler steps
    python sample.py --ckpt out/fmlm-ptb-cond/ckpt.pt --prompt "the company said"  # continue a prompt
    python sample.py --ckpt out/fmlm-ptb-cond/ckpt.pt --infill "the [MASK*3] said [MASK] stock"  # fill gaps
    python sample.py --reward lexical:market,stock,shares --reward-scale 4  # reward guidance (METHOD.md 16)

Given tokens stay clamped to their clean state at every step, so they come back unchanged; a model trained with
--cond-frac (train_flm.py, distill.py) has learned to read them.
"""

import json
import os
import sys

import torch
from tqdm import tqdm

from common import COUNT, FINITE, FRACTION, NONNEG, TOP_P, add_sampling_args, default_device
from common import out_path, parser_for, write_text
from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from data import DataError, decode, encode_text
from flow import RewardGuide, generate
from reward import RewardError, make_reward, reward_of_tokens
from model import autocast_for

parser = parser_for("Sample from an FLM (Euler ODE) or FMLM (flow map) checkpoint.", "sample.py")
a = parser.add_argument
a("--ckpt", default="out/fmlm-ptb/ckpt.pt", help="ours, or the authors': repo id, folder, .ckpt")
a("--steps", type=COUNT, help="sampler steps (None: 1 for FMLM, 256 for FLM)")
a("--num-samples", type=COUNT, default=8, help="sequences to generate")
a("--seq-len", type=COUNT, help="tokens per sequence (None: the training length)")
a("--batch-size", type=COUNT, default=64, help="sequences per forward pass")
a("--seed", type=int, default=0, help="seed of the noise x_0 (sample i is the same at any batch)")
a("--gamma", type=FRACTION, default=0.0, help="FMLM: the stochastic flow-map sampler (METHOD.md 7)")
a("--guide-ckpt", help="autoguidance: a weaker checkpoint of the same kind (METHOD.md 8)")
a("--eta", type=FINITE, default=1.0, help="autoguidance weight: D_weak + eta (D - D_weak)")
a("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
a("--out", type=out_path(folder=False), help="also write the samples as JSONL (text, tokens)")
a("--allow-long", action="store_true", help="allow --seq-len beyond the training length")
a("--prompt", help="condition on this text as the start of every sample")
a("--infill", help='condition on a text with gaps: "[MASK]" one token, "[MASK*n]" n tokens')
a("--temperature", type=NONNEG, default=0.0, help="final decode: 0 argmax, T > 0 a keyed draw")
a("--top-p", type=TOP_P, default=1.0, help="nucleus of the final draw at --temperature > 0")
a("--reward", help="lexical:WORDS, semantic:TEXT or classifier:ID_OR_FOLDER (METHOD.md 16)")
a("--reward-scale", type=FINITE, default=1.0, help="lambda, the guidance strength (0: unguided)")
a("--quiet", action="store_true", help="do not print the texts")
add_sampling_args(parser)
args = parser.parse_args()


# -----------------------------------------------------------------------------
# load

device = default_device(args.device)
try:
    ckpt = load_checkpoint(args.ckpt, logit_cap=args.logit_cap)
    weak = None
    if args.guide_ckpt:
        weak = load_checkpoint(args.guide_ckpt, kind=ckpt["kind"], logit_cap=args.logit_cap)
except CheckpointError as e:
    missing = "does not exist" in str(e)
    hint = "; train one with train_flm.py then distill.py (README)" if missing else ""
    parser.error(f"{e}{hint}")
steps = args.steps if args.steps is not None else (1 if ckpt["kind"] == "fmlm" else 256)
if args.gamma > 0 and ckpt["kind"] != "fmlm":
    needs = "the stochastic sampler needs an FMLM checkpoint (distill.py)"
    parser.error(f"argument --gamma: got {args.gamma}, but {args.ckpt} is an FLM; {needs}")
train_len = ckpt["args"]["seq_len"]
cfg = ckpt["model_config"]
if args.seq_len and args.seq_len > train_len and not args.allow_long:
    B, L = min(args.batch_size, args.num_samples), args.seq_len
    gib = (B * cfg["n_head"] * L * L + 3 * B * L * cfg["vocab_size"]) * 4 / 2**30  # scores, logits
    need = f"at batch {B} it would need about {gib:,.1f} GiB for attention scores and logits"
    expected = f"expected at most the training length {train_len}"
    parser.error(f"argument --seq-len: got {L}, {expected} ({need}; --allow-long to try anyway)")
model = model_from_checkpoint(ckpt, ema=not args.no_ema).to(device).eval()
weak_model = model_from_checkpoint(weak, ema=not args.no_ema).to(device).eval() if weak else None
seq_len = args.seq_len or ckpt["args"]["seq_len"]
vocab, tokenizer = ckpt["data"]["vocab"], ckpt["data"].get("tokenizer", "gpt2")

# -----------------------------------------------------------------------------
# conditioning: the given tokens and positions, one set shared by every sample

cond = None
if args.prompt is not None and args.infill is not None:
    parser.error("give --prompt or --infill, not both")
text, flag = (args.prompt, "--prompt") if args.prompt is not None else (args.infill, "--infill")
if text is not None:
    if not text.strip():
        parser.error(f"argument {flag}: got {text!r}, expected some text to condition on")
    try:
        ids, given = encode_text(text, vocab, tokenizer)
    except DataError as e:
        try:  # corpora such as the Penn Treebank write words with a leading space: " new", not "new"
            ids, given = encode_text(" " + text, vocab, tokenizer)
            note = f"{flag} read as {' ' + text!r}, with a leading space ({e})"
            print(f"sample.py: note: {note}", file=sys.stderr)
        except DataError:
            parser.error(f"argument {flag}: {e}")
    if not any(given):
        parser.error(f"argument {flag}: got {text!r}, which has no tokens to condition on")
    if len(ids) > seq_len:
        more = f"expected at most --seq-len {seq_len} (and fewer, to leave positions to generate)"
        parser.error(f"argument {flag}: got {len(ids)} tokens, {more}")
    if len(ids) == seq_len and all(given):
        full = f"its {len(ids)} tokens fill the whole sequence of {seq_len}"
        parser.error(f"argument {flag}: {full}; nothing is left to generate")
    pad = seq_len - len(ids)
    cond = (torch.tensor(given + [False] * pad), torch.tensor(ids + [0] * pad))
    cond = tuple(c.to(device) for c in cond)
    if not ckpt["args"].get("cond_frac"):
        note = f"{args.ckpt} was trained without --cond-frac"
        why = "it has not learned to read given tokens, so expect weak conditioning"
        print(f"sample.py: note: {note}; {why}", file=sys.stderr)

guide_reward, reward = None, None
if args.reward is not None:
    try:
        reward = make_reward(args.reward, vocab, tokenizer, args.reward_label, device)
    except (RewardError, DataError) as e:
        parser.error(f"argument --reward: {e}")
    guide_reward = RewardGuide(reward, args.reward_scale, args.reward_form, args.reward_iters)

# -----------------------------------------------------------------------------
# sample, decode, write

total = steps * -(-args.num_samples // args.batch_size)
bar = tqdm(total=total, desc=f"{ckpt['kind']} {steps} steps", file=sys.stderr, disable=args.quiet)
guide = (weak_model, args.eta) if weak_model else None
options = dict(gamma=args.gamma, reward=guide_reward, guide=guide, progress=bar)
options.update(temperature=args.temperature, top_p=args.top_p)
with autocast_for(device, args.dtype)[0]:
    n, B = args.num_samples, args.batch_size
    tokens = generate(model, n, seq_len, steps, B, args.seed, cond, **options).cpu()
bar.close()
if reward is not None:
    r = reward_of_tokens(reward, tokens, cfg["vocab_size"], device, args.batch_size)
    scale = f"--reward-scale {args.reward_scale:g}, {args.reward_form}"
    mean = f"mean {r.mean():.4f} over {len(r)} samples"
    print(f"reward {args.reward}: {mean} ({scale})", file=sys.stderr)
try:
    texts = [decode(row, vocab, tokenizer) for row in tokens.tolist()]
except DataError as e:
    parser.error(str(e))
if not args.quiet:
    for i, text in enumerate(texts):
        print(f"--- sample {i} ({ckpt['kind']}, {steps} steps)\n{text.strip()}")
if args.out:
    run = dict(kind=ckpt["kind"], steps=steps, ckpt=args.ckpt, seed=args.seed, gamma=args.gamma)
    run.update(prompt=args.prompt, infill=args.infill)
    run.update(temperature=args.temperature, top_p=args.top_p)
    if reward is not None:
        run.update(reward=args.reward, reward_scale=args.reward_scale, reward_form=args.reward_form)
    lines = []
    for i, (text, row) in enumerate(zip(texts, tokens.tolist())):
        value = {} if reward is None else dict(reward_value=float(r[i]))
        lines.append(json.dumps(dict(text=text, tokens=row, **run, **value)) + "\n")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        write_text(args.out, "".join(lines))
    except (OSError, DataError) as e:
        parser.error(f"argument --out: {e}")
    print(f"wrote {len(texts)} samples to {args.out}", file=sys.stderr)
