"""
Stage 1: train a flow language model (FLM), the denoiser D(x_t, tau) of METHOD.md 2, with cross-entropy.

    python train_flm.py                                        # CPU quick start on the Penn Treebank
    torchrun --standalone --nproc_per_node=8 train_flm.py --preset owt --compile

Runs unchanged under plain python (CPU or one GPU) and under torchrun (DDP; NCCL on GPUs, gloo on CPUs), and
trains on the same global batches whatever the number of ranks and --micro-batch (trainer.py).
"""

import copy
import math
from contextlib import nullcontext

import torch

from flow import carry_factor_grad, flm_loss, state_factor, stratified_tau
from model import MODEL_PRESETS, DiT, DiTConfig
from rng import slot_keys, step_generator
from common import BELOW_1, COUNT, parser_for
from trainer import Run, add_run_args, ema_update, get_lr, parse_with_preset

# -----------------------------------------------------------------------------
# settings: --preset sets the defaults of every run flag (--help shows them)

# the paper's settings (METHOD.md 10): AdamW 3e-4, warmup 2,500 then constant, batch 512, EMA 0.9999, 1M steps
PAPER = dict(model="small", batch_size=512, lr=3e-4, warmup=2500, decay=0.0, max_steps=1_000_000)
PAPER.update(ema=0.9999, eval_every=10_000, keep_every=0, cond_frac=0.0)
# the embedded corpus on a laptop CPU, about 7 minutes on 2 cores: the lr falls to 0 over the last 30% of the
# steps, and a short EMA follows it (a long one averages in the weights of before the decay)
PTB = dict(data="data/ptb", model="ptb", batch_size=32, micro_batch=32, seq_len=32, lr=2e-3)
PTB.update(warmup=100, decay=0.3, max_steps=1300, ema=0.99, eval_every=100, eval_windows=128)
PTB.update(keep_every=500, cond_frac=0.2)
RUN_PRESETS = {
    "ptb": PTB,
    # the longer CPU recipe (with distill.py --preset ptb-long, about 40 minutes on 2 cores): 64 tokens, and the
    # constant lr and long EMA that made its table (docs/results.md)
    "ptb-long": dict(PTB, seq_len=64, max_steps=1000, decay=0.0, ema=0.999),
    # the quick start with the tokenizer of LM1B and of the semantic reward's encoder (METHOD.md 16):
    # python data.py --tokenizer bert-base-uncased --out data/ptb-bert
    "ptb-bert": dict(PTB, data="data/ptb-bert"),
    "lm1b": dict(PAPER, data="data/lm1b", micro_batch=64, seq_len=128, eval_windows=2048),
    "owt": dict(PAPER, data="data/openwebtext", micro_batch=16, seq_len=1024, eval_windows=512),
}

parser = parser_for("Train an FLM denoiser (stage 1).", "train_flm.py")
parser.add_argument("--preset", default="ptb", choices=list(RUN_PRESETS), help="run settings")
parser.add_argument("--data", help="prepared data folder (python data.py)")
parser.add_argument("--model", choices=list(MODEL_PRESETS), help="model shape preset (model.py)")
parser.add_argument("--dropout", type=BELOW_1, help="override the model preset's dropout")
parser.add_argument("--seq-len", type=COUNT, help="tokens per sequence (windows of the stream)")
add_run_args(parser)
args = parse_with_preset(parser, RUN_PRESETS, "flm")

# -----------------------------------------------------------------------------
# ranks, precision, data, model, optimizer, resume

run = Run(args, "train_flm.py")
device = run.device
data = run.open_data(args.data)
cfg = DiTConfig(vocab_size=data.vocab_size, **MODEL_PRESETS[args.model])
if args.dropout is not None:
    cfg.dropout = args.dropout
torch.manual_seed(args.seed)  # identical initial weights on every rank
raw_model = DiT(cfg).to(device)
ema_model = copy.deepcopy(raw_model).requires_grad_(False).eval()
# AdamW as the paper (METHOD.md 10); fused: one kernel per step, on CUDA and the CPU alike
adamw = dict(lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, fused=True)
optimizer = torch.optim.AdamW(raw_model.parameters(), **adamw)
start_step = 0
if args.resume:
    ckpt = run.resume("flm", raw_model, ema_model, optimizer)
    if ckpt["data"]["vocab"] != data.vocab:
        run.fail(f"{run.ckpt_path} was trained on data with another vocabulary than {args.data}")
    start_step = ckpt["step"]
    del ckpt
model = run.wrap(raw_model)
flops = raw_model.flops_per_token(args.seq_len)
run.checkpoint_with((raw_model, ema_model), optimizer, flops, kind="flm", data=data.describe())
V, n = cfg.vocab_size, raw_model.num_params()
run.setup(f"model {args.model}: {n:,} parameters, V = {V:,}, ln V = {math.log(V):.4f}")


def val_loss(net):
    """Validation cross-entropy on fixed windows at fixed, evenly spread tau with fixed noise."""

    def loss_of(net, tokens, slots):
        tau = (slots.double() + 0.5) / args.eval_windows  # evenly spread
        keys = slot_keys(0, -1, slots)
        return flm_loss(net, tokens, tau.float().to(device), keys, given=run.given(keys))

    return run.evaluate(net, data, loss_of)


# -----------------------------------------------------------------------------
# training loop: lr -> eval and checkpoint -> micro-steps -> clip -> step -> EMA -> log

params = [p for p in raw_model.parameters() if p.requires_grad]
for step in range(start_step, args.max_steps + 1):
    # learning rate of this step
    lr = get_lr(step, args)
    for group in optimizer.param_groups:
        group["lr"] = lr

    # validation of the raw and EMA weights; a checkpoint of each validated step after the start, and of
    # every --ckpt-every step between
    if step % args.eval_every == 0 or step == args.max_steps:
        val, val_ema = val_loss(raw_model), val_loss(ema_model)
        line = f"step {step} | val loss {val:.4f} | ema val loss {val_ema:.4f}"
        run.validated(step, start_step, line, val_loss=val, ema_val_loss=val_ema)
    elif args.ckpt_every and step % args.ckpt_every == 0 and step > start_step:
        run.save(step)
    if step == args.max_steps:
        break

    # the step itself: nothing inside waits on the device (Run.no_wait)
    with run.no_wait((raw_model, ema_model), optimizer):
        # the noise factor of E (METHOD.md 14), once per step: the micro-steps read its detached leaf, whose
        # gradient goes back through the Gram product once. The product and its backward are 1.8e11 FLOPs at the
        # paper's shape, some 7% of a 16 x 1,024-token micro-step in full fp32 on an H100: at accumulation 4 (the
        # paper's OWT preset) this saves 3 of the 4.
        factor = state_factor(raw_model)
        factor_leaf = None if factor is None else factor.detach().requires_grad_()

        # micro-steps: the denoiser's cross-entropy at stratified tau (METHOD.md 2); slot i's window, noise and
        # dropout come from its key (seed, step, i), its tau from the step's one stratified draw
        taus = stratified_tau(args.batch_size, step_generator(args.seed, step))
        loss_sum = torch.zeros((), device=device)
        with run.out_of_memory(f"the forward and backward of step {step + 1}"):
            for micro in range(run.accum):
                slots = run.slots(micro)
                keys = slot_keys(args.seed, step, slots)
                tokens = data.get_batch("train", args.seq_len, keys, device)
                keys = run.to_device(keys)
                tau = run.to_device(taus[slots])
                last = micro == run.accum - 1
                # the gradients' all-reduce on the last micro-step only
                sync = model.no_sync() if run.ddp and not last else nullcontext()
                with sync, run.autocast:
                    loss = flm_loss(model, tokens, tau, keys, run.given(keys), factor_leaf)
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
