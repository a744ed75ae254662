"""
Stage 2: distillation of a trained FLM into its flow map (FMLM, FLM.md 5 and 6), by the semigroup objective
(the paper's) or the Lagrangian or Eulerian one, or self-distillation of a flow map from scratch.

    python distill.py                                          # CPU quick start, teacher out/flm-ptb/ckpt.pt
    python distill.py --objective lagrangian --out-dir out/fmlm-lagrangian
    python distill.py --self-distill --data data/ptb --model ptb   # no teacher: one model trained into a flow map
    torchrun --standalone --nproc_per_node=8 distill.py --preset owt --teacher out/flm-owt/ckpt.pt --compile

The student is the teacher's DiT plus a second time embedder for tau_t (zero-initialized, so it starts as
delta_{s,t} = D_s). Its input matrix E either stays frozen at the teacher's (the quick start), so teacher and
student read the same projected state h = x_s @ E, or trains (--train-embed, the authors' and the paper presets),
and then both read their own columns of one joint state x_s @ [E_teacher, E_student] (model.JointView).
Each batch mixes diagonal rows (target: the frozen teacher's denoiser) and
off-diagonal rows (target: the student's own two-step semigroup composition, without gradient; or the
Lagrangian / Eulerian target from a forward-mode JVP through the student and the teacher). Self-distillation
has no teacher: the diagonal rows learn the one-hot data by cross-entropy, and the student's own diagonal
delta_{s,s} plays the teacher's denoiser in the off-diagonal targets; its E trains.
"""

import argparse
import copy

import torch

from data import Data, DataError
from model import (MODEL_PRESETS, OBJECTIVES, CheckpointError, DiT, DiTConfig, TimeWarp, distill_loss, distill_times,
                   load_checkpoint, model_from_checkpoint, slot_keys, step_generator)
from trainer import FRACTION, NONNEG, Trainer, add_run_args, apply_presets, check_args, usage_error

# -----------------------------------------------------------------------------
# settings: a preset fills every flag that the command line leaves unset

RUN_PRESETS = {
    # the embedded corpus on a laptop CPU
    "ptb": dict(teacher="out/flm-ptb/ckpt.pt", batch_size=32, micro_batch=32, lr=2e-3, warmup=50, decay=0.0,
                max_steps=600, ema=0.99, eval_every=100, eval_windows=64, dropout=0.0, train_embed=False,
                cond_frac=0.2, boundary_frac=0.25),
    # the paper's settings (FLM.md 6): AdamW 3e-4, betas (0.9, 0.95), 100K steps, batch 512 (LM1B) / 128 (OWT);
    # the authors' student trains with dropout 0.1 and trains its E
    "lm1b": dict(teacher="out/flm-lm1b/ckpt.pt", batch_size=512, micro_batch=64, lr=3e-4, warmup=1000, decay=0.0,
                 max_steps=100_000, ema=0.9999, eval_every=5000, eval_windows=1024, dropout=0.1, train_embed=True,
                 cond_frac=0.0, boundary_frac=1 / 32),
    "owt": dict(teacher="out/flm-owt/ckpt.pt", batch_size=128, micro_batch=8, lr=3e-4, warmup=1000, decay=0.0,
                max_steps=100_000, ema=0.9999, eval_every=5000, eval_windows=256, dropout=0.1, train_embed=True,
                cond_frac=0.0, boundary_frac=1 / 32),
}
# the longer CPU recipe (with train_flm.py --preset ptb-long): a teacher on 64-token sequences, twice the steps,
# and the lr 1e-3 that made its table (results-long.md)
RUN_PRESETS["ptb-long"] = dict(RUN_PRESETS["ptb"], teacher="out/flm-ptb-long/ckpt.pt", max_steps=2000, lr=1e-3)

parser = argparse.ArgumentParser(description="Distill an FLM into its flow map (FMLM).")
parser.add_argument("--preset", default="ptb", choices=list(RUN_PRESETS), help="run settings to start from")
parser.add_argument("--teacher", help="FLM checkpoint from train_flm.py (its EMA weights are the teacher), or an "
                    "authors' released FLM as in sample.py --ckpt (then --data is needed)")
parser.add_argument("--logit-cap", type=float, default=None,
                    help="teacher's (and student's) output logit cap; default: the teacher's, 30 for the authors'")
parser.add_argument("--objective", choices=OBJECTIVES, default="semigroup",
                    help="the off-diagonal target (FLM.md 6): semigroup (the paper's), lagrangian or eulerian (a JVP "
                    "through the student with the explicit attention formula; targets clipped onto the simplex)")
parser.add_argument("--self-distill", action="store_true",
                    help="no teacher: train a fresh two-time DiT (--model, --data) into a flow map")
parser.add_argument("--model", choices=list(MODEL_PRESETS), help="--self-distill: model shape preset (model.py)")
parser.add_argument("--data", help="prepared data folder (default: the teacher's)")
parser.add_argument("--dropout", type=float, help="student dropout (default: the preset's; the authors' 0.1)")
parser.add_argument("--train-embed", action=argparse.BooleanOptionalAction, default=None,
                    help="train the student's input matrix E (the authors'; teacher and student then read one joint "
                    "state x_s @ [E_teacher, E_student]), or freeze it at the teacher's (default: the preset's)")
parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: the teacher's)")
parser.add_argument("--diag-frac", type=float, default=0.5, help="share of diagonal rows (tau_s = tau_t)")
parser.add_argument("--boundary-frac", type=float, help="share of the non-diagonal rows at (tau_s, tau_t) = (0, 1), "
                    "the one-step jump (default: the preset's; the paper's 1/32 is no row of a batch of 32)")
add_run_args(parser)
args = apply_presets(parser.parse_args(), RUN_PRESETS, "fmlm", "distill.py")
check_args(args, "distill.py", diag_frac=FRACTION, boundary_frac=FRACTION, logit_cap=NONNEG)
if args.self_distill:
    teacher_ckpt, args.teacher = None, None
    args.model = args.model or ("ptb" if args.preset.startswith("ptb") else "small")
    args.seq_len = args.seq_len or {"ptb": 32, "ptb-long": 64, "lm1b": 128, "owt": 1024}[args.preset]
    args.data = args.data or "data/" + {"ptb-long": "ptb", "owt": "openwebtext"}.get(args.preset, args.preset)
else:
    try:  # before the harness, which needs the sequence length for its batch arithmetic
        teacher_ckpt = load_checkpoint(args.teacher, kind="flm", logit_cap=args.logit_cap)
    except CheckpointError as e:
        raise SystemExit(f"distill.py: error: {e}")
    args.seq_len = args.seq_len or teacher_ckpt["args"]["seq_len"]
run = Trainer(args, "distill.py")  # DDP, device, precision, batch arithmetic
device = run.device

# -----------------------------------------------------------------------------
# teacher (once, frozen), student, data, optimizer, resume

if not (args.data or teacher_ckpt["data"]["dir"]):
    run.fail(f"the teacher {args.teacher} names no data folder: give --data (prepared with its tokenizer, "
             f"{teacher_ckpt['data'].get('tokenizer', 'gpt2')})")
try:
    data = Data(args.data or teacher_ckpt["data"]["dir"])
except DataError as e:
    run.fail(e)
if teacher_ckpt and (data.vocab != teacher_ckpt["data"]["vocab"]
                     or data.tokenizer != teacher_ckpt["data"].get("tokenizer", "gpt2")
                     or data.vocab_size > teacher_ckpt["model_config"]["vocab_size"]):
    run.fail(f"{data.dir} was prepared with another vocabulary than the teacher {args.teacher} was trained on")
if args.seq_len > data.max_seq_len():
    usage_error("distill.py", f"argument --seq-len: got {args.seq_len}, expected at most {data.max_seq_len()}, "
                f"the longest window that both splits of {data.dir} hold")
args.data = data.dir
torch.manual_seed(args.seed)
if args.self_distill:
    teacher = None
    raw_model = DiT(DiTConfig(vocab_size=data.vocab_size, two_time=True, **dict(MODEL_PRESETS[args.model],
                                                                                dropout=args.dropout))).to(device)
else:
    teacher = model_from_checkpoint(teacher_ckpt).to(device).eval().requires_grad_(False)
    raw_model = copy.deepcopy(teacher).train().requires_grad_(True)
    raw_model.config.dropout = args.dropout  # the deep copy has its own config
    raw_model.add_second_time()
    raw_model.embed.requires_grad_(args.train_embed)  # frozen: teacher and student read the same h = x_s @ E
cfg = raw_model.config
ema_model = copy.deepcopy(raw_model).requires_grad_(False).eval()
params = [p for p in raw_model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
warp = TimeWarp(cfg.vocab_size)
start_step = run.resume("fmlm", raw_model, ema_model, optimizer)["step"] if args.resume else 0
model = run.wrap(raw_model)
run.print_setup(f"student: {raw_model.num_params():,} parameters ({sum(p.numel() for p in params):,} trained), "
                f"V = {cfg.vocab_size:,}, E {'trained' if raw_model.embed.requires_grad else 'frozen'}, "
                f"objective {args.objective}, " + (
                    "self-distillation (no teacher)" if teacher is None else
                    f"teacher {args.teacher} (step {teacher_ckpt['step']})"))

# -----------------------------------------------------------------------------
# the loss of a micro-batch, validation, checkpoint contents


def micro_loss(model, step, slots):
    """FLM.md 6: the step's (tau_s, tau_t, diagonal) draw for the whole global batch, sliced to these slots;
    slot i's window, noise and dropout come from its key (seed, step, i)."""
    keys = slot_keys(args.seed, step, slots)
    tokens = data.get_batch("train", args.seq_len, keys, device)
    tau_s, tau_t, diag = (z[slots].to(device) for z in distill_times(
        args.batch_size, step_generator(args.seed, step), args.diag_frac, args.boundary_frac))
    return distill_loss(model, teacher, tokens, tau_s, tau_t, diag, warp, keys, args.objective, run.given(keys))


eval_times = distill_times(args.eval_windows, torch.Generator().manual_seed(0), args.diag_frac, args.boundary_frac)


def evaluate(net):
    """The distillation loss on fixed validation windows with fixed times and noise."""
    def loss_of(net, tokens, slots):
        tau_s, tau_t, diag = (z[slots].to(device) for z in eval_times)
        keys = slot_keys(0, -1, slots)
        return distill_loss(net, teacher, tokens, tau_s, tau_t, diag, warp, keys, args.objective, run.given(keys))
    return run.evaluate(net, data, loss_of)


def checkpoint():
    return dict(kind="fmlm", teacher=args.teacher, objective=args.objective, data=teacher_ckpt["data"] if teacher_ckpt
                else dict(dir=args.data, vocab_size=data.vocab_size, vocab=data.vocab, source=data.meta["source"],
                          tokenizer=data.tokenizer))


# -----------------------------------------------------------------------------
# training loop (trainer.py): lr -> eval and checkpoint -> micro-steps -> clip -> step -> EMA -> log

# per token: the student's forward and backward (6N), the teacher on the diagonal half (N), and the two no-grad
# passes of the semigroup target on the other half (2N): about 1.5x the FLM's training FLOPs
run.fit(model, ema_model, optimizer, micro_loss, evaluate, checkpoint, start_step,
        flops_per_token=1.5 * raw_model.flops_per_token(args.seq_len))
