"""
Stage 2: distillation of a trained FLM into its flow map (FMLM, METHOD.md 5 and 6), by the semigroup objective
(the paper's) or the Lagrangian or Eulerian one, or self-distillation of a flow map from scratch.

    python distill.py                                          # CPU quick start, teacher out/flm-ptb/ckpt.pt
    python distill.py --objective lagrangian --out-dir out/fmlm-lagrangian
    python distill.py --self-distill --data data/ptb --model ptb   # no teacher: one model trained into a flow map
    torchrun --standalone --nproc_per_node=8 distill.py --preset owt --teacher out/flm-owt/ckpt.pt --compile

The student is the teacher's DiT plus a zero-initialized second time embedder for tau_t, so it starts as
delta_{s,t} = D_s. Its E stays frozen at the teacher's (the quick start: both read h = x_s @ E) or trains
(--train-embed, the paper's presets: both read their columns of the joint state x_s @ [E_teacher, E_student]).
A batch mixes diagonal rows (target: the teacher's denoiser) and off-diagonal rows (target: the student's own
two-step composition, without gradient; or the Lagrangian / Eulerian target by a forward-mode JVP). Without a
teacher, the diagonal rows learn the one-hot data and the student's delta_{s,s} plays the teacher's part.
"""

import argparse
import copy
import sys
from contextlib import nullcontext

import torch

from checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from flow import OBJECTIVES, Distillation, carry_factor_grad, distill_loss, distill_times
from flow import Times, eval_times, state_factor, views
from model import MODEL_PRESETS, DiT, DiTConfig
from rng import slot_keys, step_generator
from common import BELOW_1, COUNT, FRACTION, NONNEG, fail, parser_for
from trainer import Run, add_run_args, ema_update, get_lr, parse_with_preset

# -----------------------------------------------------------------------------
# settings: --preset sets the defaults of every run flag (--help shows them)

# the paper's settings (METHOD.md 6): AdamW 3e-4, betas (0.9, 0.95), 100K steps, batch 512 (LM1B) / 128 (OWT);
# the authors' student trains with dropout 0.1 and trains its E
PAPER = dict(lr=3e-4, warmup=1000, decay=0.0, max_steps=100_000, ema=0.9999, eval_every=5000)
PAPER.update(keep_every=0, dropout=0.1, train_embed=True, cond_frac=0.0, boundary_frac=1 / 32)
# the embedded corpus on a laptop CPU
PTB = dict(teacher="out/flm-ptb/ckpt.pt", batch_size=32, micro_batch=32, lr=2e-3, warmup=50)
PTB.update(decay=0.0, max_steps=600, ema=0.99, eval_every=100, eval_windows=64, keep_every=0)
PTB.update(dropout=0.0, train_embed=False, cond_frac=0.2, boundary_frac=0.25)
LM1B = dict(PAPER, teacher="out/flm-lm1b/ckpt.pt", batch_size=512, micro_batch=64)
OWT = dict(PAPER, teacher="out/flm-owt/ckpt.pt", batch_size=128, micro_batch=8)
RUN_PRESETS = {
    "ptb": PTB,
    # the longer CPU recipe (with train_flm.py --preset ptb-long): a teacher on 64-token sequences, twice the
    # steps, and the lr 1e-3 that made its table (docs/results.md)
    "ptb-long": dict(PTB, teacher="out/flm-ptb-long/ckpt.pt", max_steps=2000, lr=1e-3),
    "ptb-bert": dict(PTB, teacher="out/flm-ptb-bert/ckpt.pt"),  # WordPiece, as train_flm.py's
    "lm1b": dict(LM1B, eval_windows=1024),
    "owt": dict(OWT, eval_windows=256),
}
SELF_DISTILL = {  # --self-distill has no teacher to take these from: (model, seq_len, data) per preset
    "ptb": ("ptb", 32, "data/ptb"),
    "ptb-long": ("ptb", 64, "data/ptb"),
    "ptb-bert": ("ptb", 32, "data/ptb-bert"),
    "lm1b": ("small", 128, "data/lm1b"),
    "owt": ("small", 1024, "data/openwebtext"),
}

parser = parser_for("Distill an FLM into its flow map (FMLM).", "distill.py")
a = parser.add_argument
a("--preset", default="ptb", choices=list(RUN_PRESETS), help="run settings")
a("--teacher", help="FLM checkpoint (its EMA weights), or an authors' model as in sample.py --ckpt")
a("--logit-cap", type=NONNEG, help="output logit cap of teacher and student (None: the teacher's)")
a("--objective", choices=OBJECTIVES, default="semigroup", help="off-diagonal target (METHOD.md 6)")
a("--self-distill", action="store_true", help="no teacher: a fresh two-time DiT (--model, --data)")
a("--model", choices=list(MODEL_PRESETS), help="--self-distill: model shape (None: the preset's)")
a("--data", help="prepared data folder (None: the teacher's)")
a("--dropout", type=BELOW_1, help="student dropout (the authors' 0.1)")
a("--train-embed", action=argparse.BooleanOptionalAction, help="train the student's E")
a("--seq-len", type=COUNT, help="tokens per sequence (None: the teacher's)")
a("--diag-frac", type=FRACTION, default=0.5, help="share of diagonal rows (tau_s = tau_t)")
a("--boundary-frac", type=FRACTION, help="share of the other rows at (tau_s, tau_t) = (0, 1)")
add_run_args(parser)
args = parse_with_preset(parser, RUN_PRESETS, "fmlm")
if args.self_distill:
    if "--no-train-embed" in sys.argv[1:]:
        fresh = "--self-distill trains every weight of its fresh model, E included"
        parser.error(f"argument --no-train-embed: {fresh}; drop the flag")
    teacher_ckpt, args.teacher, args.train_embed = None, None, True
    model_preset, seq_len, data_dir = SELF_DISTILL[args.preset]
    args.model = args.model or model_preset
    args.seq_len = args.seq_len or seq_len
    args.data = args.data or data_dir
else:
    try:  # before the batch arithmetic, which needs the teacher's sequence length
        teacher_ckpt = load_checkpoint(args.teacher, kind="flm", logit_cap=args.logit_cap)
    except CheckpointError as e:
        fail("distill.py", e)
    args.seq_len = args.seq_len or teacher_ckpt["args"]["seq_len"]

# -----------------------------------------------------------------------------
# ranks, precision, teacher (once, frozen), student, data, optimizer, resume

run = Run(args, "distill.py")
device = run.device
if not (args.data or teacher_ckpt["data"]["dir"]):
    tokenizer = teacher_ckpt["data"].get("tokenizer", "gpt2")
    give = f"give --data (prepared with its tokenizer, {tokenizer})"
    run.fail(f"the teacher {args.teacher} names no data folder: {give}")
data = run.open_data(args.data or teacher_ckpt["data"]["dir"])
if teacher_ckpt:
    taught = teacher_ckpt["data"]
    same = (data.vocab, data.tokenizer) == (taught["vocab"], taught.get("tokenizer", "gpt2"))
    if not same or data.vocab_size > teacher_ckpt["model_config"]["vocab_size"]:
        run.fail(f"{data.dir} has another vocabulary than the teacher {args.teacher} learned")
args.data = data.dir


def student(args, data, teacher_ckpt):
    """The frozen teacher (None under --self-distill) and the student the flags ask for: the teacher's DiT plus a
    zero-initialized second time embedder (so that it starts as delta_{s,t} = D_s), or a fresh two-time DiT;
    with --dropout, and its E frozen (teacher and student read h = x_s @ E) or trained (a joint state, flow.views;
    a fresh model trains every weight)."""
    torch.manual_seed(args.seed)
    if teacher_ckpt is None:
        shape = dict(MODEL_PRESETS[args.model], dropout=args.dropout)
        return None, DiT(DiTConfig(vocab_size=data.vocab_size, two_time=True, **shape)).to(device)
    teacher = model_from_checkpoint(teacher_ckpt).to(device).eval().requires_grad_(False)
    for heavy in ("model", "ema", "optimizer"):  # the teacher's weights now live in `teacher` alone
        teacher_ckpt.pop(heavy, None)
    net = copy.deepcopy(teacher).train().requires_grad_(True)
    net.config.dropout = args.dropout  # the deep copy has its own config
    net.add_second_time()
    net.embed.requires_grad_(args.train_embed)
    return teacher, net


teacher, raw_model = student(args, data, teacher_ckpt)
distillation = Distillation(teacher, args.objective, args.train_embed)
cfg = raw_model.config
ema_model = copy.deepcopy(raw_model).requires_grad_(False).eval()
params = [p for p in raw_model.parameters() if p.requires_grad]
# fused: one kernel per step, on CUDA and the CPU alike
adamw = dict(lr=args.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0, fused=True)
optimizer = torch.optim.AdamW(params, **adamw)
start_step = run.resume("fmlm", raw_model, ema_model, optimizer)["step"] if args.resume else 0
model = run.wrap(raw_model)
# per token: the student's forward and backward (6N), the teacher on the diagonal half (N), and the two no-grad
# passes of the semigroup target on the other half (2N): about 1.5x the FLM's training FLOPs
flops = 1.5 * raw_model.flops_per_token(args.seq_len)
stage = dict(kind="fmlm", teacher=args.teacher, objective=args.objective, data=data.describe())
run.checkpoint_with(
    (raw_model, ema_model), optimizer, flops, **stage
)  # data: --data, or the teacher's
trained = sum(p.numel() for p in params)
source = "self-distillation (no teacher)"
if teacher is not None:
    source = f"teacher {args.teacher} (step {teacher_ckpt['step']})"
embed = "trained" if args.train_embed else "frozen"
sizes = f"{raw_model.num_params():,} parameters ({trained:,} trained), V = {cfg.vocab_size:,}"
run.setup(f"student: {sizes}, E {embed}, objective {args.objective}, {source}")


def val_loss(net, one_step=False):
    """The distillation loss on fixed validation windows, noise and times (flow.eval_times: the training mix of
    rows, each window's times its own); one_step: every window at (tau_s, tau_t) = (0, 1), the one-step map."""

    def loss_of(net, tokens, slots):
        keys = slot_keys(0, -1, slots)
        if one_step:
            times = Times(torch.zeros(len(slots)), torch.ones(len(slots)), 0)
        else:
            times = eval_times(slots, args.eval_windows, args.diag_frac, args.boundary_frac)
        return distill_loss(net, distillation, tokens, times.on(device), keys, run.given(keys))

    return run.evaluate(net, data, loss_of)


# -----------------------------------------------------------------------------
# training loop: lr -> eval and checkpoint -> micro-steps -> clip -> step -> EMA -> log

for step in range(start_step, args.max_steps + 1):
    # learning rate of this step
    lr = get_lr(step, args)
    for group in optimizer.param_groups:
        group["lr"] = lr

    # validation of the raw and EMA weights; a checkpoint of every validated step after the start, and of every
    # --ckpt-every step between
    if step % args.eval_every == 0 or step == args.max_steps:
        val, val_ema = val_loss(raw_model), val_loss(ema_model)
        one, one_ema = val_loss(raw_model, one_step=True), val_loss(ema_model, one_step=True)
        line = f"step {step} | val loss {val:.4f} | ema val loss {val_ema:.4f} | one-step val loss {one:.4f}"
        line += f" | ema one-step val loss {one_ema:.4f}"
        metrics = dict(
            val_loss=val, ema_val_loss=val_ema, one_step_val_loss=one, ema_one_step_val_loss=one_ema
        )
        run.validated(step, start_step, line, **metrics)
    elif args.ckpt_every and step % args.ckpt_every == 0 and step > start_step:
        run.save(step)
    if step == args.max_steps:
        break

    # the step itself: nothing inside waits on the device (Run.no_wait)
    with run.no_wait((raw_model, ema_model, teacher), optimizer):
        # the noise factor of the state the student reads, once per step as in train_flm.py (no gradient when E
        # is frozen)
        factor = state_factor(views(raw_model, distillation)[1])
        factor_leaf = (
            None if factor is None else factor.detach().requires_grad_(factor.requires_grad)
        )

        # micro-steps: the step's (tau_s, tau_t) draw for the global batch (METHOD.md 6), the first n_diag rows of
        # each micro-batch diagonal; slot i's window, noise and dropout come from its key (seed, step, i)
        g = step_generator(args.seed, step)
        frac = (args.diag_frac, args.boundary_frac)
        times = distill_times(args.batch_size, g, *frac, block=args.micro_batch)
        loss_sum = torch.zeros((), device=device)
        with run.out_of_memory(f"the forward and backward of step {step + 1}"):
            for micro in range(run.accum):
                slots = run.slots(micro)
                keys = slot_keys(args.seed, step, slots)
                tokens = data.get_batch("train", args.seq_len, keys, device)
                keys = run.to_device(keys)
                last = micro == run.accum - 1
                # the gradients' all-reduce on the last micro-step only
                sync = model.no_sync() if run.ddp and not last else nullcontext()
                own = times.rows(slots).on(device)  # this micro-step's rows' times
                with sync, run.autocast:
                    cond = run.given(keys)
                    loss = distill_loss(model, distillation, tokens, own, keys, cond, factor_leaf)
                (loss / run.accum).backward()
                loss_sum += loss.detach()

        # the factor's gradient, clip, step, EMA
        carry_factor_grad(factor, factor_leaf)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema_update(ema_model, raw_model, step, args.ema)

    # the finite check's flag, the log line at the log steps (their one sync), and a stop request (SIGTERM,
    # SIGUSR1, Ctrl-C) that every rank agrees on after this step, which rank 0 then checkpoints
    if run.end_step(step + 1, loss_sum, grad_norm, lr):
        break

run.finish()
