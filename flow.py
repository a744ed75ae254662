"""
The method's mathematics as plain functions (METHOD.md), shared by training, distillation, sampling and
evaluation: the time warp, the noise and the projected state, the interpolant, the losses, conditioning, the flow
map, the semigroup / Lagrangian / Eulerian targets, and the samplers. The network is model.py; every function here
takes it as an argument (bare, DDP-wrapped or compiled) and works on the projected state h = x @ E of METHOD.md 14,
or on the dense (B, L, V) state where `dense=True`, the reference that the tests compare against.

Times: flow maps take (x_s, s, t) with s <= t in physical time; the network is fed the reparameterized tau.
"""

import math
from collections import Counter
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import DECODE, GIVEN, NOISE, attention_backend, capped, row_key, row_normal, row_uniform, slot_keys, unwrap

# -----------------------------------------------------------------------------
# the flow math: time warp (METHOD.md 3)


def _interp(x, xp, fp):
    """Piecewise-linear interpolation of the increasing table (xp, fp) at x, on x's device, no host sync."""
    x64 = x.double().clamp(0.0, 1.0)
    i = torch.searchsorted(xp, x64, right=True).clamp(1, len(xp) - 1)
    w = (x64 - xp[i - 1]) / (xp[i] - xp[i - 1])
    return (fp[i - 1] + w * (fp[i] - fp[i - 1])).to(x.dtype)


class TimeWarp:
    """tau(t) = (q(t) - 1/V) / (1 - 1/V), q the argmax decoding rate of x_t (METHOD.md 3), and d tau / dt in closed
    form under the same quadrature, tabulated once on a uniform grid of t."""

    def __init__(self, vocab_size, n_grid=10_000, n_quad=801):
        V = vocab_size
        # E_{z~N(0,1)} f(z) by the trapezoid rule on [-10, 10]: the integrands are smooth with a step of width about
        # 0.2 near z + m = Phi^-1(1 - 1/V), which this resolves to 1e-13, while 100 Gauss-Hermite nodes (the
        # authors') are off by 9e-5 in tau at V = 50,257 (METHOD.md 3)
        z = torch.linspace(-10, 10, n_quad, dtype=torch.float64)
        w = torch.exp(-z ** 2 / 2) / math.sqrt(2 * math.pi) * (z[1] - z[0])
        t = torch.linspace(0, 1, n_grid + 1, dtype=torch.float64)[:-1]
        m = t / (1 - t)
        y = z + m[:, None]  # (n_grid, n_quad)
        # P_e = 1 - q = E[1 - Phi(z + m)^(V-1)], with expm1 so that tiny error rates keep their precision
        log_cdf = torch.special.log_ndtr(y)
        p_err = (w * -torch.expm1((V - 1) * log_cdf)).sum(-1)
        tau = 1 - V / (V - 1) * p_err
        # dq/dm = E[(V-1) Phi(y)^(V-2) phi(y)], in log space; dm/dt = 1 / (1 - t)^2
        log_dq = math.log(V - 1) + (V - 2) * log_cdf - y ** 2 / 2 - 0.5 * math.log(2 * math.pi)
        dtau = V / (V - 1) * (w * log_dq.exp()).sum(-1) / (1 - t) ** 2
        # tau can dip below 0 by rounding near t = 0, and near t = 1 the error rate underflows so tau is 1.0 in
        # float64: keep the strictly increasing points, then (1, 1),
        # where d tau / dt is 0 (the error rate vanishes faster than any power of 1 - t)
        tau[0] = 0.0
        keep = torch.cat([torch.tensor([True]), tau[1:] > torch.cummax(tau, 0).values[:-1]]) & (tau < 1.0)
        one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
        self.t_table, self.tau_table = torch.cat([t[keep], one]), torch.cat([tau[keep], one])
        self.dtau_table = torch.cat([dtau[keep], zero])
        self._tables = {}

    def _on(self, device):
        if device not in self._tables:
            self._tables[device] = (self.t_table.to(device), self.tau_table.to(device), self.dtau_table.to(device))
        return self._tables[device]

    def t(self, tau):
        """Physical time of reparameterized time tau (any shape)."""
        t_tab, tau_tab, _ = self._on(tau.device)
        return _interp(tau, tau_tab, t_tab)

    def tau(self, t):
        """Reparameterized time of physical time t (any shape)."""
        t_tab, tau_tab, _ = self._on(t.device)
        return _interp(t, t_tab, tau_tab)

    def dtau_dt(self, t):
        """d tau / dt at physical time t, from its closed form (the chain rule of the Lagrangian and Eulerian
        objectives, METHOD.md 6)."""
        t_tab, _, dtau_tab = self._on(t.device)
        return _interp(t, t_tab, dtau_tab)


_warps = {}


def time_warp(model):
    """The TimeWarp of a model's vocabulary size, tabulated once per size."""
    V = unwrap(model).config.vocab_size
    if V not in _warps:
        _warps[V] = TimeWarp(V)
    return _warps[V]


def stratified_tau(n, generator):
    """n stratified tau ~ U(0, 1), randomly permuted: tau_i = (u + i) / n (METHOD.md 3); slice it per rank."""
    u = torch.rand((), generator=generator, dtype=torch.float64)
    tau = (u + torch.arange(n, dtype=torch.float64)) / n
    return tau[torch.randperm(n, generator=generator)].float()


# -----------------------------------------------------------------------------
# the flow math: interpolant, denoiser, flow map, semigroup (METHOD.md 1, 2, 4, 5)


class Gram(torch.autograd.Function):
    """E^T E (D, D) for E (V, D). Its forward computes the blocks on and above the diagonal and mirrors them (5/8 of
    the product's multiply-adds); its backward is the one product E (G' + G'^T), where autograd's rule for E.T @ E
    takes two (METHOD.md 14)."""

    @staticmethod
    def forward(ctx, embed, blocks=4):
        ctx.save_for_backward(embed)
        D = embed.shape[1]
        step, G = -(-D // blocks), embed.new_empty(D, D)
        for i in range(0, D, step):
            row = embed[:, i:i + step].T @ embed[:, i:]  # (step, D - i): the diagonal block and those right of it
            G[i:i + step, i:] = row
            G[i + step:, i:i + step] = row[:, step:].T
        return G

    @staticmethod
    def backward(ctx, grad):
        (embed,) = ctx.saved_tensors
        return embed @ (grad + grad.T), None


def noise_factor(embed):
    """C (D, D) with C C^T = E^T E, so that z C^T ~ x_0 @ E for z ~ N(0, I_D) (METHOD.md 14). The Gram product, V D^2
    multiply-adds, runs in fp32 (at the dtype of E); only the D x D factorization runs in float64."""
    with torch.autocast(embed.device.type, enabled=False):  # cholesky_ex: no error check, so no host sync; a
        # non-finite E gives a non-finite factor, which the loop's finite check then reports
        return torch.linalg.cholesky_ex(Gram.apply(embed).double()).L.to(embed.dtype)


def joint_noise_factor(embed):
    """W (D', D') with W^T W = E^T E for an E (V, D') whose columns may be dependent, as in the joint state below,
    where the student's E starts equal to the teacher's. With E^T E = U diag(lam) U^T, Q = E U diag(lam)^-1/2 is an
    orthonormal basis of E's columns (its dependent directions dropped) and W = Q^T E, so x_0 @ E = (x_0 @ Q) W with
    x_0 @ Q ~ N(0, I) exactly. Q is held without gradient: the gradient in E is then the pathwise one of x_0 @ E
    projected on E's column space, whose complement is independent of the loss, so it is unbiased. In float64,
    which resolves the nearly dependent directions of a student that has just left its teacher."""
    with torch.no_grad():
        e = embed.double()
        lam, U = torch.linalg.eigh(e.T @ e)
        inv_sqrt = torch.where(lam > lam.max() * 1e-10, lam.clamp_min(1e-300).rsqrt(), torch.zeros_like(lam))
        Q = (e @ (U * inv_sqrt)).to(embed.dtype)
    with torch.autocast(embed.device.type, enabled=False):
        return Q.T @ embed


def state_factor(model):
    """F (D', D') with z @ F ~ x_0 @ E for z ~ N(0, I), the noise of the state the model reads: C^T of noise_factor,
    or W of joint_noise_factor for a JointView; None when V <= D (then x_0 itself is drawn). A training step
    computes it once for all its micro-steps (trainer.carry_factor_grad)."""
    model = unwrap(model)
    V, D = model.embed.shape
    if V <= D:
        return None
    return joint_noise_factor(model.embed) if isinstance(model, JointView) else noise_factor(model.embed).T


class JointView(nn.Module):
    """Two DiTs with input matrices of their own read one x: the state is h = x @ [E_a, E_b] (B, L, D_a + D_b) and
    each network reads its own columns. Distillation with a trained student E reads the teacher and the student
    this way, and autoguidance the model and its weaker checkpoint. The noise x_0 @ [E_a, E_b] is one Gaussian of
    dimension D_a + D_b (joint_noise_factor), and the flow-map arithmetic is linear, so it runs on h unchanged."""

    def __init__(self, net, embed, cols):
        super().__init__()
        self.net, self.embed, self.cols, self.config = net, embed, cols, net.config

    def project(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return x.float() @ self.embed

    def forward(self, h, *args, **kwargs):
        return self.net(h[..., self.cols], *args, **kwargs)


def joint_views(a, b):
    """JointView of each of two DiTs on the state x @ [E_a, E_b]."""
    a, b = unwrap(a), unwrap(b)
    embed, D = torch.cat([a.embed, b.embed], dim=1), a.config.n_embd
    return JointView(a, embed, slice(0, D)), JointView(b, embed, slice(D, None))


def draw_noise(model, keys, L, stream=NOISE, dense=False, factor=None):
    """x_0 ~ N(0, I) for rows with keys (B,): dense (B, L, V), or projected x_0 @ E (B, L, D) without forming x_0,
    as z @ factor (state_factor's, computed here if not given). Always fp32, also under autocast."""
    model = unwrap(model)
    E, keys = model.embed, keys.to(model.embed.device)
    (V, D), B = E.shape, len(keys)
    if dense:  # the authors' (B, L, V) state: torch's generator per row (the hash is slow at V = 50,257 on CPU)
        return torch.stack([torch.randn(L, V, device=E.device, generator=torch.Generator(E.device).manual_seed(
            row_key(int(k), stream, 0))) for k in keys.tolist()])
    if V <= D:  # E^T E is singular; such vocabularies are tiny, so draw x_0 itself
        return model.project(row_normal(keys, L * V, stream).view(B, L, V))
    factor = state_factor(model) if factor is None else factor
    with torch.autocast(E.device.type, enabled=False):
        return row_normal(keys, L * D, stream).view(B, L, D) @ factor


def interpolate(x0, x1, t):
    """x_t = (1 - t) x_0 + t x_1 (METHOD.md 1); t (B,) broadcast over the trailing dims."""
    t = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * x1


def noisy_input(model, tokens, t, keys, dense=False, given=None, factor=None):
    """The network input h_t = x_t @ E for tokens (B, L) at times t (B,), noise from the rows' keys -> (B, L, D).
    given (B, L) bool: positions fed clean, x_1 = one_hot(token), at every time (conditioning)."""
    model = unwrap(model)
    x0 = draw_noise(model, keys, tokens.size(1), dense=dense, factor=factor)
    if dense:
        x1 = F.one_hot(tokens, model.config.vocab_size).float()
        return model.project(clamp_given(interpolate(x0, x1, t), given, x1))
    x1 = model.embed[tokens]  # one_hot(tokens) @ E = E[tokens]
    return clamp_given(interpolate(x0, x1, t), given, x1)


def flm_loss(model, tokens, tau, keys, given=None, factor=None, dense=False):
    """Token cross-entropy of the denoiser at reparameterized times tau (B,) (METHOD.md 2); keys (B,) give each
    row its noise and dropout. given (B, L): positions fed clean and left out of the loss (conditioning). factor:
    the step's state_factor, computed once for all its micro-steps."""
    keys = keys.to(tokens.device)
    h = noisy_input(model, tokens, time_warp(unwrap(model)).t(tau), keys, dense, given, factor)
    logits = model(h, tau, keys=keys, cap=False)  # the output cap is applied in the loss, a chunk at a time
    ce = CrossEntropy.apply(logits, tokens, unwrap(model).config.logit_cap, True)
    return ce.mean() if given is None else free_mean(ce, given)


def soft_cross_entropy(logits, target, given=None, cap=0.0, consume=False):
    """-sum_V target * log_softmax(cap * tanh(logits / cap)) (no cap: of the logits), mean over positions
    (METHOD.md 6), or over the free ones of each row; consume: as CrossEntropy's."""
    ce = CrossEntropy.apply(logits, target, cap, consume)
    return ce.mean() if given is None else free_mean(ce, given)


class CrossEntropy(torch.autograd.Function):
    """Per-position cross-entropy (B, L) of logits (B, L, V), output-capped as cap * tanh(logits / cap) when cap >
    0, against token ids (B, L) or a distribution (B, L, V), in fp32 a chunk of positions at a time. It keeps only
    the log-normalizer of each position for the backward, which recomputes the cap and writes (softmax - target)
    times its slope straight into the gradient of the logits: F.cross_entropy would keep an fp32 log-softmax of
    (B, L, V) and, under bf16 autocast, an fp32 copy of the logits too; the cap would keep two more. consume: the
    logits are needed by nothing else, so the backward writes their gradient over them (one (B, L, V) less)."""

    @staticmethod
    def forward(ctx, logits, target, cap=0.0, consume=False, chunk_elems=2 ** 22):
        rows, soft = logits.reshape(-1, logits.size(-1)), target.dim() == logits.dim()
        flat = target.reshape(-1, logits.size(-1)) if soft else target.reshape(-1, 1)
        acc = torch.promote_types(logits.dtype, torch.float32)  # fp32, or float64 for a float64 model
        lse, ce, step = rows.new_empty(len(rows), dtype=acc), [], max(1, chunk_elems // rows.size(1))
        for i in range(0, len(rows), step):
            x, t = rows[i:i + step].to(acc), flat[i:i + step]
            x = capped(x, cap) if cap > 0 else x
            picked = (t.to(acc) * x).sum(-1) if soft else x.gather(1, t)[:, 0]
            # capped logits are at most cap: their exponentials neither overflow nor need the max taken out first
            lse[i:i + step] = x.exp_().sum(-1).log_() if cap > 0 else x.logsumexp(-1)
            ce.append((t.to(acc).sum(-1) if soft else 1.0) * lse[i:i + step] - picked)
        ctx.save_for_backward(logits, target, lse)
        ctx.step, ctx.cap, ctx.consume = step, cap, consume
        return torch.cat(ce).view(logits.shape[:-1])

    @staticmethod
    def backward(ctx, grad):
        logits, target, lse = ctx.saved_tensors
        rows, soft, step, cap = logits.reshape(-1, logits.size(-1)), target.dim() == logits.dim(), ctx.step, ctx.cap
        flat = target.reshape(-1, logits.size(-1)) if soft else target.reshape(-1, 1)
        g = grad.reshape(-1, 1).to(lse.dtype)
        out = rows if ctx.consume else torch.empty_like(rows)
        for i in range(0, len(rows), step):
            y, t = rows[i:i + step].to(lse.dtype), flat[i:i + step]
            y = capped(y, cap) if cap > 0 else y
            p = torch.sub(y, lse[i:i + step, None], out=out[i:i + step] if out.dtype == y.dtype else None).exp_()
            if soft:
                p.mul_(t.to(p.dtype).sum(-1, keepdim=True)).sub_(t.to(p.dtype))
            else:
                p.scatter_add_(1, t, p.new_full(t.shape, -1.0))
            if cap > 0:  # the slope of the cap, 1 - (y / cap)^2
                p.mul_(y.div_(cap).square_().neg_().add_(1))
            p.mul_(g[i:i + step])
            if p.dtype != out.dtype:  # bf16 logits: the gradient was formed in fp32
                out[i:i + step] = p
        return out.view(logits.shape), None, None, None, None


# -----------------------------------------------------------------------------
# conditioning: given positions stay clean at every time and are left out of the loss (the authors' answer to
# prompts, david3684/flm#8); the time stays one global time per row


def given_mask(keys, L, frac):
    """(B, L) bool from each row's key: a row is conditional with probability frac; half of those are given a
    prefix of 1 to L - 1 tokens (a prompt), the others alternating given and free spans (infilling), a boundary
    after each position with probability 4 / L and a random first span. The last position of an all-given row
    is freed."""
    u = row_uniform(keys, L + 4, GIVEN)
    cond, prefix = u[:, :1] < frac, u[:, 1:2] < 0.5
    pos = torch.arange(L, device=keys.device)
    prompt = pos < 1 + (u[:, 2:3] * (L - 1)).long()
    spans = ((u[:, 4:] < 4 / L).long().cumsum(1) + (u[:, 3:4] < 0.5).long()) % 2 == 1
    given = cond & torch.where(prefix, prompt, spans)
    return given & ~(given.all(1, keepdim=True) & (pos == L - 1))


def clamp_given(h, given, clean):
    """h with its given positions set to their clean state; h itself when nothing is given."""
    return h if given is None else torch.where(given[..., None], clean, h)


def free_mean(loss, given):
    """Mean of a per-position loss (B, L) over each row's free positions, then over rows: a row weighs the same
    whatever it is given, so the mean does not depend on how the batch is split."""
    free = (~given).float()
    return ((loss * free).sum(1) / free.sum(1).clamp_min(1)).mean()


def denoiser(model, h, tau_s, tau_t=None, keys=None):
    """D = softmax(f(h, tau_s[, tau_t])) in fp32: the posterior mean of x_1, or delta_{s,t} (METHOD.md 2, 5)."""
    return model(h, tau_s, tau_t, keys=keys).float().softmax(dim=-1)


def flow_map(x, delta, s, t):
    """X_{s,t}(x) = ((1 - t) x + (t - s) delta) / (1 - s) (METHOD.md 5). With delta = D_s it is the Euler step
    x + (t - s) (D - x) / (1 - s) of METHOD.md 4. s, t: scalars or (B,) tensors."""
    if torch.is_tensor(s) and s.dim() == 1:
        s, t = s.view(-1, 1, 1), t.view(-1, 1, 1)
    return ((1 - t) * x + (t - s) * delta) / (1 - s)


def semigroup_weight(s, u, t):
    """g = (1 - t)(u - s) / ((1 - u)(t - s)) for s < u < t (METHOD.md 5); g is in [0, 1]."""
    g = (1 - t) * (u - s) / ((1 - u) * (t - s))
    return g.clamp(0.0, 1.0)  # float32 rounding when u is within an ulp of s or t


@torch.no_grad()
def semigroup_target(model, h_s, tau_s, tau_u, tau_t, keys=None, given=None, clean=None):
    """g delta_{s,u}(x_s) + (1 - g) delta_{u,t}(X_{s,u}(x_s)), from the model itself (METHOD.md 6); (B, L, V).
    keys + 1 and keys + 2 give the two passes dropout masks of their own; given positions stay clean."""
    model = unwrap(model)
    warp = time_warp(model)
    s, u, t = warp.t(tau_s), warp.t(tau_u), warp.t(tau_t)
    more = (lambda i: None) if keys is None else (lambda i: keys + i)
    delta_su = denoiser(model, h_s, tau_s, tau_u, more(1))
    y = clamp_given(flow_map(h_s, model.project(delta_su), s, u), given, clean)
    delta_ut = denoiser(model, y, tau_u, tau_t, more(2))
    g = semigroup_weight(s, u, t).view(-1, 1, 1)
    return g * delta_su + (1 - g) * delta_ut


def distill_times(n, generator, diag_frac=0.5, boundary_frac=1 / 32, block=None):
    """tau_s, tau_t (n,) and n_diag for a distillation batch of n rows in micro-batches of `block` rows (METHOD.md
    6). The first n_diag = round(diag_frac block) rows of each micro-batch are diagonal, tau_s = tau_t ~ U(0, 1): a
    fixed count, so every micro-step has the same shapes. Of the other rows of the batch, round(boundary_frac their
    number), chosen at random, are at (tau_s, tau_t) = (0, 1), and the rest off-diagonal with d ~ U(0, 1),
    tau_s = U' (1 - d), tau_t = tau_s + d."""
    block = block or n
    n_diag = round(block * diag_frac)
    diag = torch.arange(n) % block < n_diag
    u, d, tau = torch.rand(3, n, generator=generator)
    others = (~diag).nonzero()[:, 0]
    boundary = torch.zeros(n, dtype=torch.bool)
    boundary[others[torch.randperm(len(others), generator=generator)[:round(len(others) * boundary_frac)]]] = True
    tau_off = tau * (1 - d)
    tau_s = torch.where(diag, u, torch.where(boundary, 0.0, tau_off))
    tau_t = torch.where(diag, u, torch.where(boundary, 1.0, tau_off + d))
    return tau_s, tau_t, n_diag


# the Lagrangian and Eulerian characterizations of the flow map (METHOD.md 6), as targets for delta_{s,t}; s < t are
# physical times, D the teacher's denoiser, x = I_s the state at s. They are written on given quantities so that
# the tests can check them on an exact flow map; *_target below builds them from a student and a teacher.


def lagrangian(D_t_of_X, ddelta_dt, s, t):
    """D_t(X_{s,t}(x)) - (1 - t)(t - s) / (1 - s) d/dt delta_{s,t}(x): d/dt X_{s,t} = b_t(X_{s,t}) solved for delta."""
    s, t = (z.view(-1, 1, 1) if torch.is_tensor(z) and z.dim() == 1 else z for z in (s, t))
    return D_t_of_X - (1 - t) * (t - s) / (1 - s) * ddelta_dt


def eulerian(D_s, directional, s, t):
    """D_s(x) + (t - s) / (1 - t) ((1 - s) d/ds delta_{s,t}(x) + (D_s(x) - x) . grad_x delta_{s,t}(x)), the second
    factor given as `directional`: d/ds X_{s,t} + b_s . grad X_{s,t} = 0 solved for delta."""
    s, t = (z.view(-1, 1, 1) if torch.is_tensor(z) and z.dim() == 1 else z for z in (s, t))
    return D_s + (t - s) / (1 - t) * directional


def jvp_denoiser(model, h, tau_s, tau_t, dh, dtau_s, dtau_t):
    """delta_{s,t}(h) (B, L, V) and its derivative along the tangent (dh, dtau_s, dtau_t), in forward mode. The
    explicit attention formula runs here: flash-attn and flex_attention have no forward-mode AD."""
    net = unwrap(model)
    with attention_backend("explicit"):
        return torch.func.jvp(lambda h, a, b: net(h, a, b).float().softmax(dim=-1), (h, tau_s, tau_t),
                              (dh, dtau_s, dtau_t))


@torch.no_grad()
def lagrangian_target(student, teacher_denoiser, h_s, tau_s, tau_t, given=None, clean=None):
    """The Lagrangian target from the student (stop-gradient) and D = teacher_denoiser(h, tau); (B, L, V)."""
    warp = time_warp(student)
    s, t = warp.t(tau_s), warp.t(tau_t)
    zero = torch.zeros_like(tau_s)
    delta, ddelta_dtau_t = jvp_denoiser(student, h_s, tau_s, tau_t, torch.zeros_like(h_s), zero, torch.ones_like(tau_s))
    X = clamp_given(flow_map(h_s, unwrap(student).project(delta), s, t), given, clean)  # X_{s,t}(x_s), student's delta
    return lagrangian(teacher_denoiser(X, tau_t), ddelta_dtau_t * warp.dtau_dt(t).view(-1, 1, 1), s, t)


EULERIAN_T_MAX = 1 - 1e-3  # the Eulerian target is evaluated at t' = min(t, EULERIAN_T_MAX) (METHOD.md 6)


@torch.no_grad()
def eulerian_target(student, teacher_denoiser, h_s, tau_s, tau_t, given=None, clean=None):
    """The Eulerian target; in the projected state the x-tangent D_s - x_s is D_s @ E - h_s, and 0 at given
    positions, which do not move; (B, L, V). At t = 1 the equation says nothing about delta, so the whole target
    (network time, tangent and coefficient) is taken at the consistent t' = EULERIAN_T_MAX for rows beyond it."""
    warp = time_warp(student)
    s, t = warp.t(tau_s), warp.t(tau_t)
    late = t > EULERIAN_T_MAX
    t = torch.where(late, EULERIAN_T_MAX, t)
    tau_t = torch.where(late, warp.tau(torch.full_like(t, EULERIAN_T_MAX)), tau_t)
    D_s = teacher_denoiser(h_s, tau_s)
    dh = unwrap(student).project(D_s) - h_s
    dh = clamp_given(dh, given, torch.zeros_like(dh))
    _, directional = jvp_denoiser(student, h_s, tau_s, tau_t, dh, (1 - s) * warp.dtau_dt(s), torch.zeros_like(tau_t))
    return eulerian(D_s, directional, s, t)


def onto_simplex(v):
    """The Euclidean projection of v (..., V) onto the probability simplex, the nearest point of it (sparsemax's):
    max(v - theta, 0) with theta the one threshold that makes it sum to 1. The Lagrangian and Eulerian targets are
    not convex combinations and can leave the simplex, where the soft cross-entropy is unbounded (METHOD.md 6)."""
    u = v.sort(dim=-1, descending=True).values
    excess = u.cumsum(-1) - 1  # sum of the k largest, minus 1
    k = torch.arange(1, v.size(-1) + 1, device=v.device, dtype=v.dtype)
    support = (u - excess / k > 0).sum(-1, keepdim=True)  # how many entries stay positive (a prefix of u)
    theta = excess.gather(-1, support - 1) / support
    return (v - theta).clamp_min(0)


OBJECTIVES = ("semigroup", "lagrangian", "eulerian")


@torch.no_grad()
def distill_targets(net, D, h, tokens, times, keys, objective, given):
    """The soft targets (B, L, V) of a distillation micro-batch whose first n_diag rows are diagonal (times = (tau_s,
    tau_t, n_diag)): the denoiser D(h, tau) there (or the one-hot data when D is None: self-distillation), the
    objective's target on the other rows (METHOD.md 6). Slices, not masks: the shapes are the same every step."""
    tau_s, tau_t, n = times
    V = net.config.vocab_size
    diagonal = F.one_hot(tokens[:n], V).float() if D is None else D(h[:n], tau_s[:n])
    if n == len(tokens):
        return diagonal
    D = D or (lambda h, tau: denoiser(net, h, tau, tau))  # self-distillation: the student's own delta_{s,s}
    args = (h[n:], tau_s[n:], tau_t[n:])
    fix = {} if given is None else dict(given=given[n:], clean=net.embed[tokens[n:]])
    if objective == "semigroup":
        off = semigroup_target(net, *args[:2], (tau_s[n:] + tau_t[n:]) / 2, args[2], keys[n:], **fix)
    elif objective == "lagrangian":
        off = onto_simplex(lagrangian_target(net, D, *args, **fix))
    else:
        off = onto_simplex(eulerian_target(net, D, *args, **fix))
    return torch.cat([diagonal, off])


def reading(student, teacher):
    """(teacher, student) as they read the distillation state: a student with a frozen E reads the teacher's
    h = x_s @ E; one that trains its E reads its own columns of the joint state x_s @ [E_teacher, E_student]."""
    net = unwrap(student)
    return joint_views(teacher, net) if teacher is not None and net.embed.requires_grad else (teacher, net)


def distill_loss(student, teacher, tokens, times, keys, objective="semigroup", given=None, factor=None):
    """Flow-map distillation loss (METHOD.md 6): soft cross-entropy of the student's delta_{s,t}(x_s) against the
    targets of distill_targets; times = (tau_s, tau_t, n_diag), the first n_diag rows diagonal. teacher None:
    self-distillation. The two read the state as `reading` says; keys (B,) give each row its noise and dropout;
    given (B, L): positions kept clean and left out of the loss (conditioning); factor: the step's state_factor of
    the student's reading."""
    keys, (tau_s, tau_t) = keys.to(tokens.device), times[:2]
    teacher, net = reading(student, teacher)
    cols = net.cols if isinstance(net, JointView) else slice(None)
    h = noisy_input(net, tokens, time_warp(net).t(tau_s), keys, given=given, factor=factor)
    D = None if teacher is None else (lambda h, tau: denoiser(teacher, h, tau))
    target = distill_targets(net, D, h, tokens, times, keys, objective, given)
    logits = student(h[..., cols], tau_s, tau_t, keys=keys, cap=False)  # capped in the loss
    return soft_cross_entropy(logits, target, given, unwrap(student).config.logit_cap, consume=True)


# -----------------------------------------------------------------------------
# the samplers (METHOD.md 4, 7, 8): one loop over the time grid; each step asks for a denoiser, optionally
# autoguided, and moves the state by the flow map, optionally with the stochastic jump and fresh noise


def guided_denoiser(model, x, tau_s, tau_t, guide=None, dense=False):
    """D (B, L, V) at state x; guide = (weak_model, eta): autoguidance D_weak + eta (D - D_weak) (METHOD.md 8), affine
    in D, so the step stays exact. In the projected state both models must read x (JointView, as generate does)."""
    read = (lambda m, z: unwrap(m).project(z)) if dense else (lambda m, z: z)  # state -> the network's input
    d = denoiser(model, read(model, x), tau_s, tau_t)
    if guide is not None:
        weak_model, eta = guide
        d = eta * d + (1 - eta) * denoiser(weak_model, read(weak_model, x), tau_s, tau_t)
    return d


class RewardGuide(NamedTuple):
    """Reward guidance (METHOD.md 16): reward maps soft sequences (B, L, V) to (B,); scale is lambda; form is
    "endpoint" (ascend the clean prediction's logits) or "lookahead" (move the state along the reward's gradient
    through the network); iters gradient steps of scale / iters each, at every sampler step."""
    reward: Callable
    scale: float
    form: str = "endpoint"
    iters: int = 1


def tilt(d, guide):
    """End-point guidance: d (B, L, V) on the simplex, moved by gradient ascent of the reward on its logits log d."""
    logits = d.clamp_min(torch.finfo(d.dtype).tiny).log()
    with torch.enable_grad():
        for _ in range(guide.iters):
            logits = logits.detach().requires_grad_()
            (g,) = torch.autograd.grad(guide.reward(logits.softmax(-1)).sum(), logits)
            logits = logits + guide.scale / guide.iters * g
    return logits.detach().softmax(-1)


def lookahead_grad(model, x, tau_s, reward, dense=False):
    """The gradient in the state x of r(delta_{s,1}(x)) (D_s(x) for an FLM), carried back through the network: in
    the space the state lives in, h (B, L, D) or, dense, x (B, L, V)."""
    net = unwrap(model)
    with torch.enable_grad():
        x = x.detach().requires_grad_()
        tau_1 = torch.ones_like(tau_s) if net.config.two_time else None
        d = denoiser(model, net.project(x) if dense else x, tau_s, tau_1)
        return torch.autograd.grad(reward(d).sum(), x)[0]


def lookahead_step(model, x, s, tau_s, guide, dense=False, gram=None):
    """One look-ahead step: x moves along the x-space gradient g_x of r(delta_{s,1}(x)) by a fixed length,
    scale / iters * (1 - s) sqrt(L D) (the noise x_0 @ E has that length in its own metric at s = 0: a
    trust-region step). In the projected state h = x @ E the x-space step is g_h (E^T E), |g_x|^2 = g_h . g_h E^T E;
    gram: E^T E, computed once per sampling run by the caller (here if not given)."""
    net = unwrap(model)
    g = lookahead_grad(model, x, tau_s, guide.reward, dense).float()
    if dense:
        step, norm2 = g, (g * g).sum((1, 2))
    else:
        gram = Gram.apply(net.embed.detach().float()) if gram is None else gram
        with torch.autocast(x.device.type, enabled=False):
            step = g @ gram
        norm2 = (step * g).sum((1, 2))
    length = guide.scale / guide.iters * (1 - s) * math.sqrt(x.size(1) * net.config.n_embd)
    return x + length * step / norm2.clamp_min(1e-30).sqrt().view(-1, 1, 1)


def stochastic_jump(t, gamma):
    """The stochastic flow-map sampler's jump time t~ = 1 - (1 - t) sqrt(1 - gamma^2) (METHOD.md 7)."""
    return 1 - (1 - t) * math.sqrt(1 - gamma ** 2)


def stochastic_step(x, lifted_d, s, t, gamma, noise):
    """The stochastic flow-map step from s to t (METHOD.md 7): the map to t~, then back to t's noise level,
    X_{s,t~}(x) + (t - t~) delta + gamma (1 - t) eps; lifted_d is delta in the state space, noise is eps."""
    t_jump = stochastic_jump(t, gamma)
    return flow_map(x, lifted_d, s, t_jump) + (t - t_jump) * lifted_d + gamma * (1 - t) * noise


def decode_tokens(d, temperature=0.0, top_p=1.0, keys=None):
    """The tokens (B, L) of the last denoiser d (B, L, V): its argmax at temperature 0; else a draw from
    d^(1/T), renormalized on the nucleus (the fewest most probable tokens whose mass reaches top_p), in float64 by
    the inverse CDF of a uniform keyed by row (METHOD.md 11), so a sample does not depend on its batch."""
    if temperature == 0:
        return d.argmax(dim=-1)
    if keys is None:
        raise ValueError("temperature > 0 needs the rows' keys")
    B, L, _ = d.shape
    u = row_uniform(keys, L, DECODE).double() + (row_uniform(keys, L, DECODE + 1).double() - 0.5) * 2.0 ** -24
    out = torch.empty(B, L, dtype=torch.long, device=d.device)
    for b in range(B):  # a row at a time: the float64 sort of (L, V)
        p = (d[b].double().clamp_min(1e-300).log() / temperature).softmax(-1)
        p, order = p.sort(dim=-1, descending=True, stable=True)  # stable: ties in the order argmax takes them
        p = p * (p.cumsum(-1) - p < top_p)  # the nucleus: every token whose predecessors hold less than top_p
        cdf = p.cumsum(-1)
        j = (cdf < u[b, :, None] * cdf[:, -1:]).sum(-1).clamp_max(p.size(-1) - 1)
        out[b] = order.gather(-1, j[:, None])[:, 0]
    return out


@torch.no_grad()
def sample(model, x, steps, cond=None, gamma=0.0, keys=None, guide=None, dense=False, progress=None, reward=None,
           temperature=0.0, top_p=1.0):
    """Generate tokens (B, L) from noise x: the Euler ODE for a denoiser, the flow map for a two-time model.

    x is the projected x_0 @ E (B, L, D) from draw_noise, or the dense x_0 (B, L, V) if dense.
    cond = (given, tokens), (B, L) each: conditioning, given positions clamped to their tokens at every step.
    gamma > 0: the stochastic flow-map sampler (METHOD.md 7), its noise from the rows' keys (B,).
    guide = (weak_model, eta): autoguidance (METHOD.md 8).
    reward: a RewardGuide (METHOD.md 16); scale 0 leaves the sampler untouched.
    temperature, top_p: the final decode (decode_tokens): argmax at temperature 0, else a keyed draw.
    """
    net = unwrap(model)
    two_time, warp = net.config.two_time, time_warp(net)
    if gamma > 0 and (not two_time or keys is None):
        raise ValueError("gamma > 0 needs a flow-map (two-time) model and the rows' keys")
    lift = (lambda p: p) if dense else net.project  # denoiser (B, L, V) -> the state space
    given, clean = None, None
    if cond is not None:
        given, tokens = cond
        clean = F.one_hot(tokens, net.config.vocab_size).float() if dense else net.embed[tokens]
    x = clamp_given(x, given, clean)
    look = reward is not None and reward.scale != 0 and reward.form == "lookahead"
    gram = Gram.apply(net.embed.float()) if look and not dense else None  # E^T E once, not at every step
    taus = torch.linspace(0, 1, steps + 1, device=x.device)
    ts = warp.t(taus)
    for i in (progress or (lambda r: r))(range(steps)):
        s, t = ts[i], ts[i + 1]
        t_jump = stochastic_jump(t, gamma) if gamma > 0 else t
        tau_s = taus[i].expand(x.size(0))
        tau_t = (warp.tau(t_jump) if gamma > 0 else taus[i + 1]).expand(x.size(0)) if two_time else None
        if look:
            for _ in range(reward.iters):
                x = clamp_given(lookahead_step(model, x, s, tau_s, reward, dense, gram), given, clean)
        d = guided_denoiser(model, x, tau_s, tau_t, guide, dense)
        if reward is not None and reward.scale != 0 and reward.form == "endpoint":
            d = tilt(d, reward)
        if gamma > 0:
            x = stochastic_step(x, lift(d), s, t, gamma, draw_noise(net, keys, x.size(1), NOISE + 1 + i, dense))
        else:
            x = flow_map(x, lift(d), s, t)
        x = clamp_given(x, given, clean)
    out = decode_tokens(d, temperature, top_p, keys)  # the last step lands on t = 1, where x = d
    return out if given is None else torch.where(given, tokens, out)


def generate(model, num_samples, L, steps, batch_size=64, seed=0, cond=None, **options):
    """num_samples sequences (num_samples, L) in batches; sample i comes from the key (seed, 0, i), so it is the
    same whatever the batch size. cond = (given, tokens), (num_samples, L) or (L,) each: conditioning. options:
    those of sample (gamma, guide, progress). A weak model with another E than the model's reads the same x
    through the joint state (JointView)."""
    guide = options.pop("guide", None)
    if guide is not None and not torch.equal(unwrap(model).embed, unwrap(guide[0]).embed):
        model, weak_model = joint_views(model, guide[0])
        guide = (weak_model, guide[1])
    if cond is not None:
        cond = tuple(c.expand(num_samples, L) for c in cond)
    out = []
    for start in range(0, num_samples, batch_size):
        rows = slice(start, min(start + batch_size, num_samples))
        keys = slot_keys(seed, 0, range(rows.start, rows.stop))
        x = draw_noise(model, keys, L)
        out.append(sample(model, x, steps, None if cond is None else (cond[0][rows], cond[1][rows]), keys=keys,
                          guide=guide, **options))
    return torch.cat(out)


def factorized_sample(model, num_samples, L, batch_size=64, seed=0):
    """The one-step control (METHOD.md 13): each position drawn independently from the model's own per-position
    marginal D(x_0, tau = 0), which is what a discrete diffusion sampler does in one step. Tokens (num_samples, L)."""
    net, out = unwrap(model), []
    for start in range(0, num_samples, batch_size):
        keys = slot_keys(seed, 0, range(start, min(start + batch_size, num_samples)))
        tau = torch.zeros(len(keys), device=net.embed.device)
        p = denoiser(net, draw_noise(net, keys, L), tau, tau if net.config.two_time else None)  # (B, L, V)
        u = row_uniform(keys.to(p.device), L, NOISE + 1)[..., None]  # inverse CDF, one uniform per position
        idx = (p.cumsum(-1) < u * p.sum(-1, keepdim=True)).sum(-1)
        out.append(idx.clamp_max(p.size(-1) - 1))
    return torch.cat(out)


# -----------------------------------------------------------------------------
# evaluation metrics (METHOD.md 11)


def unigram_entropy(tokens):
    """Unigram entropy in nats of each row's own token ids (B, L), averaged over rows."""
    entropies = []
    for row in tokens:
        p = torch.unique(row, return_counts=True)[1].double() / len(row)
        entropies.append(-(p * p.log()).sum())
    return torch.stack(entropies).mean().item()


def self_bleu(samples, n=4):
    """Self-BLEU-n (METHOD.md 11): the BLEU-n of each sample (a sequence of ids) against all the others as
    references, averaged: clipped precisions of the orders 1..n, their geometric mean (no smoothing: a sample that
    shares no n-gram of some order scores 0) and the brevity penalty. 1: the samples repeat each other; nan for
    fewer than two samples."""
    if len(samples) < 2:
        return math.nan
    grams = [[Counter(zip(*[s[i:] for i in range(k)])) for k in range(1, n + 1)] for s in map(list, samples)]
    top = []  # per order: n-gram -> (largest count, its sample, largest count in any other sample)
    for k in range(n):
        best = {}
        for j, sample_grams in enumerate(grams):
            for g, v in sample_grams[k].items():
                m, owner, second = best.get(g, (0, -1, 0))
                best[g] = (v, j, m) if v > m else (m, owner, max(second, v))
        top.append(best)
    lengths, scores = [sum(c[0].values()) for c in grams], []
    for j, sample_grams in enumerate(grams):
        log_p = 0.0
        for k in range(n):
            others = lambda g: top[k][g][2] if top[k][g][1] == j else top[k][g][0]
            clipped, total = sum(min(v, others(g)) for g, v in sample_grams[k].items()), sum(sample_grams[k].values())
            if clipped == 0:
                log_p = -math.inf
                break
            log_p += math.log(clipped / total) / n
        ref = min((abs(r - lengths[j]), r) for i, r in enumerate(lengths) if i != j)[1]
        scores.append(math.exp(log_p + min(0.0, 1 - ref / max(lengths[j], 1))))
    return sum(scores) / len(scores)


def at_entropy(sweep, H):
    """The rows of one sampler at several temperatures (dicts of T, entropy, gen_ppl, lo, hi) -> (gen PPL, lo, hi,
    T_a, T_b) at entropy H: log PPL linear in entropy between the first two neighbours in temperature that bracket
    H (METHOD.md 11); None when H is outside the sweep."""
    sweep = sorted(sweep, key=lambda r: r["T"])
    for a, b in zip(sweep, sweep[1:]):
        if min(a["entropy"], b["entropy"]) <= H <= max(a["entropy"], b["entropy"]):
            w = 0.0 if a["entropy"] == b["entropy"] else (H - a["entropy"]) / (b["entropy"] - a["entropy"])
            return (*(math.exp((1 - w) * math.log(a[k]) + w * math.log(b[k])) for k in ("gen_ppl", "lo", "hi")),
                    a["T"], b["T"])
    return None


def causal_nll(logits, ids, mask):
    """Summed NLL and token count of ids (B, T) under causal-LM logits (B, T, V'); the first token is unscored."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None])[..., 0]  # (B, T - 1)
    m = mask[:, 1:].to(logp.dtype)
    return -(logp * m).sum().item(), int(m.sum().item())
