"""
The method's mathematics as plain functions (METHOD.md): the time warp, the noise and the projected state, the
losses, conditioning, the flow map and its distillation targets, the samplers. Every function takes the network
(model.py; bare, DDP-wrapped or compiled) and works on the projected state h = x @ E (METHOD.md 14); with E = I
they run on the dense (B, L, V) state x itself, the authors' formulation (the tests' reference, test_simplex.py).
Flow maps take (x_s, s, t), s <= t in physical time; the network is fed the reparameterized tau.
"""

import math
from contextlib import contextmanager
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F

from common import to_device
from model import unwrap
from rng import PASS_KEYS, row_key, row_normal, row_uniform, slot_keys, stream

# -----------------------------------------------------------------------------
# the time warp (METHOD.md 3)


def quadrature(rule):
    """Nodes z and weights w with sum w f(z) ~ E f(z), z ~ N(0, 1), float64: "exact", the trapezoid on 801
    points of [-10, 10]; "authors", their models' 100 Gauss-Hermite nodes."""
    if rule == "authors":
        nodes, weights = np.polynomial.hermite.hermgauss(100)
        z, w = nodes * math.sqrt(2), weights / math.sqrt(math.pi)
        return torch.from_numpy(z), torch.from_numpy(w)
    z = torch.linspace(-10, 10, 801, dtype=torch.float64)
    return z, torch.exp(-(z**2) / 2) / math.sqrt(2 * math.pi) * (z[1] - z[0])


class TimeWarp:
    """tau(t) = (q(t) - 1/V) / (1 - 1/V), q the argmax decoding rate of x_t, and d tau / dt in closed form,
    under a quadrature rule, tabulated once on a uniform grid of t (METHOD.md 3)."""

    def __init__(self, vocab_size, rule="exact", n_grid=10_000):
        V = vocab_size
        z, w = quadrature(rule)
        t = torch.linspace(0, 1, n_grid + 1, dtype=torch.float64)[:-1]
        y = z + (t / (1 - t))[:, None]  # z + m, (n_grid, n_quad)
        # 1 - q = E[1 - Phi(z + m)^(V-1)], by expm1 so that tiny error rates keep their precision
        log_cdf = torch.special.log_ndtr(y)
        tau = 1 - V / (V - 1) * (w * -torch.expm1((V - 1) * log_cdf)).sum(-1)
        # dq/dm = E[(V-1) Phi(y)^(V-2) phi(y)] in log space; dm/dt = 1 / (1 - t)^2
        log_dq = math.log(V - 1) + (V - 2) * log_cdf - y**2 / 2 - 0.5 * math.log(2 * math.pi)
        dtau = V / (V - 1) * (w * log_dq.exp()).sum(-1) / (1 - t) ** 2
        # rounding dips tau below 0 near t = 0 and makes it 1.0 near t = 1: keep the strictly increasing
        # points below 1, then (1, 1), where d tau / dt is 0
        tau[0] = 0.0
        rising = torch.cat([torch.tensor([True]), tau[1:] > torch.cummax(tau, 0).values[:-1]])
        keep = rising & (tau < 1)
        one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
        self.t_table = torch.cat([t[keep], one])
        self.tau_table = torch.cat([tau[keep], one])
        self.dtau_table = torch.cat([dtau[keep], zero])
        self._on_device = {}  # device -> the tables by name, copied there once

    def _lookup(self, x, src, dst):
        """Piecewise-linear interpolation of table dst over the increasing table src at x, on x's device."""
        if x.device not in self._on_device:
            names = ("t_table", "tau_table", "dtau_table")
            self._on_device[x.device] = {n: to_device(getattr(self, n), x.device) for n in names}
        xp, fp = self._on_device[x.device][src], self._on_device[x.device][dst]
        x64 = x.double().clamp(0.0, 1.0)
        i = torch.searchsorted(xp, x64, right=True).clamp(1, len(xp) - 1)
        w = (x64 - xp[i - 1]) / (xp[i] - xp[i - 1])
        return (fp[i - 1] + w * (fp[i] - fp[i - 1])).to(x.dtype)

    def t(self, tau):
        return self._lookup(tau, "tau_table", "t_table")

    def tau(self, t):
        return self._lookup(t, "t_table", "tau_table")

    def dtau_dt(self, t):
        return self._lookup(t, "t_table", "dtau_table")


_warps = {}


def time_warp(model):
    """The TimeWarp a model was trained under (its vocabulary size and config.time_warp), tabulated once."""
    cfg = unwrap(model).config
    key = (cfg.vocab_size, cfg.time_warp)
    if key not in _warps:
        _warps[key] = TimeWarp(*key)
    return _warps[key]


def stratified_tau(n, generator):
    """n stratified tau_i = (u + i) / n, randomly permuted (METHOD.md 3); slice it per rank."""
    u = torch.rand((), generator=generator, dtype=torch.float64)
    tau = (u + torch.arange(n, dtype=torch.float64)) / n
    return tau[torch.randperm(n, generator=generator)].float()


# -----------------------------------------------------------------------------
# the noise and the projected state (METHOD.md 14)


@contextmanager
def ieee_fp32():
    """Matrix products in full IEEE fp32 inside, whatever the global setting (TF32 on CUDA, bf16 in oneDNN), by
    the one API torch 2.13 has for both (fp32_precision: the legacy allow_tf32 must not be mixed with it)."""
    backends = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    saved = [b.fp32_precision for b in backends]
    for b in backends:
        b.fp32_precision = "ieee"
    try:
        yield
    finally:
        for b, value in zip(backends, saved):
            b.fp32_precision = value


def noise_factor(embed):
    """C with C C^T = E^T E, so that z C^T ~ x_0 @ E for z ~ N(0, I_D). E^T E is the noise's covariance: a full
    fp32 product (1.8e11 FLOPs with its backward at V = 50,257, D = 768), factorized in float64."""
    with torch.autocast(embed.device.type, enabled=False), ieee_fp32():
        gram = embed.T @ embed
    # cholesky_ex: no host sync; a non-finite E gives a non-finite factor, which the finite check reports
    return torch.linalg.cholesky_ex(gram.double()).L.to(embed.dtype)


def joint_noise_factor(embed):
    """W with W^T W = E^T E for an E whose columns may be dependent (a student's E that starts as its teacher's):
    W = Q^T E, Q (V, 2 D) an orthonormal basis of a space that holds E's columns, from a Householder QR (no E
    makes it fail, and it checks nothing on the host: no wait), held without gradient, so that
    x_0 @ E = (x_0 @ Q) W with x_0 @ Q ~ N(0, I) and E's gradient exact. In fp32: 2.4e11 FLOPs at V = 50,257,
    2 D = 1,536, as many as the Gram product beside it."""
    with torch.autocast(embed.device.type, enabled=False), ieee_fp32():
        Q = torch.linalg.qr(embed.detach()).Q
        return Q.T @ embed


def state_factor(model):
    """F with z @ F ~ x_0 @ E for z ~ N(0, I): noise_factor's C^T, or joint_noise_factor's W for a JointView;
    None when V <= D (then x_0 itself is drawn). A training step computes it once for its micro-steps."""
    model = unwrap(model)
    if model.embed.size(0) <= model.embed.size(1):
        return None
    if isinstance(model, JointView):
        return joint_noise_factor(model.embed)
    return noise_factor(model.embed).T


def carry_factor_grad(factor, factor_leaf):
    """The noise factor's gradient, gathered on its detached leaf over a step's micro-steps, carried back to E
    once, averaged over ranks first as DDP averages every other gradient."""
    if factor_leaf is not None and factor_leaf.grad is not None:
        if dist.is_initialized():
            dist.all_reduce(factor_leaf.grad, op=dist.ReduceOp.AVG)
        factor.backward(factor_leaf.grad)


class JointView(nn.Module):
    """A DiT reading its own columns of a joint state h = x @ [E_a, E_b]: a teacher and a student that trains
    its E, or a model and a weaker guide with another E (METHOD.md 14)."""

    def __init__(self, net, embed, cols):
        super().__init__()
        self.net, self.embed, self.cols, self.config = net, embed, cols, net.config

    def project(self, x):
        with torch.autocast(x.device.type, enabled=False):
            return x.float() @ self.embed

    def forward(self, h, *args, **kwargs):
        return self.net(h[..., self.cols], *args, **kwargs)


def joint_views(a, b):
    a, b = unwrap(a), unwrap(b)
    embed = torch.cat([a.embed, b.embed], dim=1)  # (V, 2 D)
    width = a.config.n_embd
    return JointView(a, embed, slice(0, width)), JointView(b, embed, slice(width, None))


def one_hot(tokens, V):
    """float (..., V) one-hot rows of tokens; F.one_hot would check the ids' range on the host (a wait)."""
    out = torch.zeros(*tokens.shape, V, device=tokens.device)
    return out.scatter_(-1, tokens[..., None], 1.0)


def clean_state(model, tokens):
    """x_1 @ E = E[tokens], the clean state of tokens (B, L)."""
    return unwrap(model).embed[tokens]


def draw_noise(model, keys, L, j=0, factor=None):
    """Noise j (rng.STREAMS) x_0 @ E (B, L, D) of the rows with keys (B,), in fp32, drawn as z @ state_factor
    without forming x_0."""
    model = unwrap(model)
    keys = keys.to(model.embed.device)
    factor = state_factor(model) if factor is None else factor
    B, V = len(keys), model.config.vocab_size
    if factor is None:  # E^T E singular (a tiny vocabulary) or the state x itself: draw x_0
        return model.project(row_normal(keys, L * V, j).view(B, L, V))
    with torch.autocast(keys.device.type, enabled=False):
        return row_normal(keys, L * factor.size(0), j).view(B, L, -1) @ factor


# -----------------------------------------------------------------------------
# the interpolant, the loss, conditioning, the flow map (METHOD.md 1, 2, 5)


def interpolate(x0, x1, t):
    """x_t = (1 - t) x_0 + t x_1 (METHOD.md 1), t (B,)."""
    t = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * x1


def noisy_input(model, tokens, t, keys, given=None, factor=None):
    """h_t = x_t @ E (B, L, D) of tokens (B, L) at times t (B,); given positions (B, L) are fed clean."""
    model = unwrap(model)
    x1 = clean_state(model, tokens)
    x0 = draw_noise(model, keys, tokens.size(1), factor=factor)
    return clamp_given(interpolate(x0, x1, t), given, x1)


def flm_loss(model, tokens, tau, keys, given=None, factor=None):
    """The denoiser's token cross-entropy at times tau (B,) (METHOD.md 2); keys (B,) give each row its noise
    and dropout; given positions are fed clean and left out; factor: the step's state_factor."""
    keys = keys.to(tokens.device)
    h = noisy_input(model, tokens, time_warp(model).t(tau), keys, given, factor)
    return cross_entropy(model(h, tau, keys=keys), tokens, given)


def cross_entropy(logits, target, given=None):
    """Cross-entropy against token ids (B, L) or distributions (B, L, V), in fp32 (float64 stays), averaged
    over positions or each row's free ones."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    target = target.to(logits.dtype) if target.is_floating_point() else target
    ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(0, 1), reduction="none")
    ce = ce.view(logits.shape[:2])
    return ce.mean() if given is None else free_mean(ce, given)


# conditioning: given positions stay clean at every time and out of the loss, one global time per row (the
# authors' answer to prompts, david3684/flm#8)


def given_mask(keys, L, frac):
    """(B, L) bool from each row's key: with probability frac a row is conditional, half of those on a prefix
    of 1 to L - 1 tokens (a prompt), half on alternating given and free spans (infilling, a boundary after each
    position with probability 4 / L, a random first span). An all-given row's last position is freed."""
    u = row_uniform(keys, L + 4, stream("given"))
    cond, prefix = u[:, :1] < frac, u[:, 1:2] < 0.5
    pos = torch.arange(L, device=keys.device)
    prompt = pos < 1 + (u[:, 2:3] * (L - 1)).long()
    spans = ((u[:, 4:] < 4 / L).long().cumsum(1) + (u[:, 3:4] < 0.5).long()) % 2 == 1
    given = cond & torch.where(prefix, prompt, spans)
    return given & ~(given.all(1, keepdim=True) & (pos == L - 1))


def clamp_given(h, given, clean):
    return h if given is None else torch.where(given[..., None], clean, h)


def free_mean(loss, given):
    """The mean of loss (B, L) over each row's free positions, then over rows: independent of the batch split."""
    free = (~given).float()
    return ((loss * free).sum(1) / free.sum(1).clamp_min(1)).mean()


def denoiser(model, h, tau_s, tau_t=None, keys=None):
    """D = softmax(f(h, tau_s[, tau_t])) in fp32: the posterior mean of x_1, or delta_{s,t} (METHOD.md 2, 5)."""
    return model(h, tau_s, tau_t, keys=keys).float().softmax(dim=-1)


def _per_row(*times):
    """(B,) times as (B, 1, 1); scalars as they are."""
    return [x.view(-1, 1, 1) if torch.is_tensor(x) and x.dim() == 1 else x for x in times]


def flow_map(x, delta, s, t):
    """X_{s,t}(x) = ((1 - t) x + (t - s) delta) / (1 - s) (METHOD.md 5); with delta = D_s, the Euler step."""
    s, t = _per_row(s, t)
    return ((1 - t) * x + (t - s) * delta) / (1 - s)


def semigroup_weight(s, u, t):
    """g = (1 - t)(u - s) / ((1 - u)(t - s)) for s < u < t (METHOD.md 5), in [0, 1]."""
    return ((1 - t) * (u - s) / ((1 - u) * (t - s))).clamp(0.0, 1.0)  # fp32 rounding near u = s, t


# -----------------------------------------------------------------------------
# the distillation targets (METHOD.md 6)


def plus(keys, name):
    """The keys of the pass `name` (rng.PASS_KEYS), which draws dropout masks of its own; None stays None."""
    return None if keys is None else keys + PASS_KEYS[name]


@torch.no_grad()
def semigroup_target(model, h_s, tau_s, tau_u, tau_t, keys=None, given=None, clean=None):
    """g delta_{s,u}(x_s) + (1 - g) delta_{u,t}(X_{s,u}(x_s)) from the model itself; (B, L, V). Its two passes
    draw dropout masks of their own (plus); given positions stay clean."""
    model = unwrap(model)
    warp = time_warp(model)
    s, u, t = warp.t(tau_s), warp.t(tau_u), warp.t(tau_t)
    delta_su = denoiser(model, h_s, tau_s, tau_u, plus(keys, "s to u"))
    y = clamp_given(flow_map(h_s, model.project(delta_su), s, u), given, clean)
    delta_ut = denoiser(model, y, tau_u, tau_t, plus(keys, "u to t"))
    g = semigroup_weight(s, u, t).view(-1, 1, 1)
    return g * delta_su + (1 - g) * delta_ut


class Times(NamedTuple):
    """The times of a distillation batch (METHOD.md 6): tau_s, tau_t (B,), its first n_diag rows diagonal."""

    tau_s: torch.Tensor
    tau_t: torch.Tensor
    n_diag: int

    def rows(self, slots):
        """The times of rows `slots` of a global batch laid out by micro-batches (distill_times's block)."""
        return Times(self.tau_s[slots], self.tau_t[slots], self.n_diag)

    def on(self, device):
        return Times(to_device(self.tau_s, device), to_device(self.tau_t, device), self.n_diag)


def distill_times(n, generator, diag_frac=0.5, boundary_frac=1 / 32, block=None):
    """tau_s, tau_t (n,) and n_diag for n rows in micro-batches of `block`: the first n_diag =
    round(diag_frac block) rows of each micro-batch diagonal (fixed shapes), round(boundary_frac x the others)
    of the other rows at (0, 1), the rest off-diagonal."""
    block = block or n
    n_diag = round(block * diag_frac)
    diag = torch.arange(n) % block < n_diag
    u, d, tau = torch.rand(3, n, generator=generator)
    others = (~diag).nonzero()[:, 0]
    pick = torch.randperm(len(others), generator=generator)[: round(len(others) * boundary_frac)]
    boundary = torch.zeros(n, dtype=torch.bool)
    boundary[others[pick]] = True
    tau_off = tau * (1 - d)
    tau_s = torch.where(diag, u, torch.where(boundary, 0.0, tau_off))
    tau_t = torch.where(diag, u, torch.where(boundary, 1.0, tau_off + d))
    return Times(tau_s, tau_t, n_diag)


def eval_times(slots, n, diag_frac=0.5, boundary_frac=1 / 32):
    """Validation's fixed tau_s, tau_t of windows `slots` (ascending) of n, and how many of them are diagonal (a
    prefix): the first round(diag_frac n) windows diagonal, the last round(boundary_frac x the others) at (0, 1),
    the rest off-diagonal, as distill_times lays out a batch. Each window draws its times from a generator of its
    own, so they never depend on the micro-batch or rank that holds it."""
    n_diag = round(n * diag_frac)
    n_one = round((n - n_diag) * boundary_frac)
    tau_s, tau_t = torch.empty(len(slots)), torch.empty(len(slots))
    for j, i in enumerate(slots.tolist()):
        u, d, tau = torch.rand(3, generator=torch.Generator().manual_seed(row_key(0, -2, i)))
        s, t = (
            (u, u)
            if i < n_diag
            else (0.0, 1.0)
            if i >= n - n_one
            else (tau * (1 - d), tau * (1 - d) + d)
        )
        tau_s[j], tau_t[j] = s, t
    return Times(tau_s, tau_t, int((slots < n_diag).sum()))


# The Lagrangian and Eulerian characterizations solved for delta_{s,t}, written on given quantities (s < t
# physical, D the teacher's denoiser, x the state at s) so that the tests check them on an exact flow map.


def lagrangian(D_t_of_X, ddelta_dt, s, t):
    """D_t(X_{s,t}(x)) - (1 - t)(t - s) / (1 - s) d/dt delta_{s,t}(x)."""
    s, t = _per_row(s, t)
    return D_t_of_X - (1 - t) * (t - s) / (1 - s) * ddelta_dt


def eulerian(D_s, directional, s, t):
    """D_s(x) + (t - s) / (1 - t) directional, directional = (1 - s) d/ds delta + (D_s(x) - x) . grad delta."""
    s, t = _per_row(s, t)
    return D_s + (t - s) / (1 - t) * directional


def jvp_denoiser(model, h, tau_s, tau_t, tangent, keys=None):
    """delta_{s,t}(h) and its derivative along tangent = (dh, dtau_s, dtau_t) in forward mode, with the explicit
    attention formula (flash-attn and flex_attention have no forward-mode AD); keys: the dropout masks' rows."""
    net = unwrap(model)
    f = lambda h, a, b: net(h, a, b, keys=keys, backend="explicit").float().softmax(dim=-1)
    return torch.func.jvp(f, (h, tau_s, tau_t), tangent)


@torch.no_grad()
def lagrangian_target(
    student, teacher_denoiser, h_s, tau_s, tau_t, keys=None, given=None, clean=None
):
    """The Lagrangian target from the student (stop-gradient; its forward-mode pass's own dropout) and D =
    teacher_denoiser(h, tau); (B, L, V)."""
    warp = time_warp(student)
    s, t = warp.t(tau_s), warp.t(tau_t)
    zero = torch.zeros_like(tau_s)
    tangent = (torch.zeros_like(h_s), zero, torch.ones_like(tau_s))  # d / d tau_t
    delta, ddelta_dtau_t = jvp_denoiser(
        student, h_s, tau_s, tau_t, tangent, plus(keys, "forward mode")
    )
    X = clamp_given(flow_map(h_s, unwrap(student).project(delta), s, t), given, clean)
    ddelta_dt = ddelta_dtau_t * warp.dtau_dt(t).view(-1, 1, 1)
    return lagrangian(teacher_denoiser(X, tau_t), ddelta_dt, s, t)


EULERIAN_T_MAX = 1 - 1e-3  # the Eulerian target is taken at t' = min(t, EULERIAN_T_MAX)


@torch.no_grad()
def eulerian_target(
    student, teacher_denoiser, h_s, tau_s, tau_t, keys=None, given=None, clean=None
):
    """The Eulerian target; (B, L, V). The x-tangent D_s - x_s is D_s @ E - h_s, 0 at given positions. At t = 1
    the equation says nothing about delta, so rows beyond EULERIAN_T_MAX take all of it at t' = EULERIAN_T_MAX."""
    warp = time_warp(student)
    s, t = warp.t(tau_s), warp.t(tau_t)
    late = t > EULERIAN_T_MAX
    t = torch.where(late, EULERIAN_T_MAX, t)
    tau_t = torch.where(late, warp.tau(torch.full_like(t, EULERIAN_T_MAX)), tau_t)
    D_s = teacher_denoiser(h_s, tau_s)
    dh = unwrap(student).project(D_s) - h_s
    dh = clamp_given(dh, given, torch.zeros_like(dh))
    tangent = (dh, (1 - s) * warp.dtau_dt(s), torch.zeros_like(tau_t))
    _, directional = jvp_denoiser(student, h_s, tau_s, tau_t, tangent, plus(keys, "forward mode"))
    return eulerian(D_s, directional, s, t)


def onto_simplex(v):
    """The Euclidean projection of v (..., V) onto the simplex, max(v - theta, 0) with the one theta that sums
    to 1: the Lagrangian and Eulerian targets can leave it, where the soft cross-entropy is unbounded."""
    u = v.sort(dim=-1, descending=True).values
    excess = u.cumsum(-1) - 1  # sum of the k largest, minus 1
    k = torch.arange(1, v.size(-1) + 1, device=v.device, dtype=v.dtype)
    support = (u - excess / k > 0).sum(-1, keepdim=True)  # how many stay positive: a prefix of u
    return (v - excess.gather(-1, support - 1) / support).clamp_min(0)


OBJECTIVES = ("semigroup", "lagrangian", "eulerian")


def own_teacher(net, keys):
    """Self-distillation's teacher: the student's own delta_{s,s}, its pass with dropout masks of its own."""
    return lambda h, tau: denoiser(net, h, tau, tau, plus(keys, "own teacher"))


@torch.no_grad()
def distill_targets(net, teacher_denoiser, h, tokens, times, keys, objective, given):
    """Soft targets (B, L, V) for Times: on the first n_diag rows teacher_denoiser(h, tau) (the one-hot data when
    it is None: self-distillation), on the others the objective's. Slices, not masks: the same shapes every
    step."""
    n = times.n_diag
    if teacher_denoiser is None:
        diagonal = one_hot(tokens[:n], net.config.vocab_size)
    else:
        diagonal = teacher_denoiser(h[:n], times.tau_s[:n])
    if n == len(tokens):
        return diagonal
    h, tokens, keys, (tau_s, tau_t, _) = h[n:], tokens[n:], keys[n:], times.rows(slice(n, None))
    given, clean = (None, None) if given is None else (given[n:], clean_state(net, tokens))
    if objective == "semigroup":
        tau_u = (tau_s + tau_t) / 2
        off_diagonal = semigroup_target(net, h, tau_s, tau_u, tau_t, keys, given, clean)
    else:
        solved = lagrangian_target if objective == "lagrangian" else eulerian_target
        teacher_denoiser = teacher_denoiser or own_teacher(net, keys)
        off_diagonal = onto_simplex(
            solved(net, teacher_denoiser, h, tau_s, tau_t, keys, given, clean)
        )
    return torch.cat([diagonal, off_diagonal])


class Distillation(NamedTuple):
    """What a student learns from (METHOD.md 6): a teacher (None: self-distillation), the off-diagonal objective,
    and whether the student trains its own E. That last one is the run's setting, never read off requires_grad,
    so that the student's EMA and a validation pass read the state as the trained student does."""

    teacher: nn.Module | None = None
    objective: str = "semigroup"
    train_embed: bool = False


def views(student, distillation):
    """(teacher, student) as they read the state: with a frozen E both read the teacher's x_s @ E; a student that
    trains its E reads its own columns of the joint state x_s @ [E_teacher, E_student]."""
    net, teacher = unwrap(student), distillation.teacher
    if teacher is not None and distillation.train_embed:
        return joint_views(teacher, net)
    return teacher, net


def distill_loss(student, distillation, tokens, times, keys, given=None, factor=None):
    """The student's soft cross-entropy against distill_targets (METHOD.md 6) at Times; given positions clean
    and left out; factor: the step's state_factor."""
    keys = keys.to(tokens.device)
    tau_s, tau_t = times.tau_s, times.tau_t
    teacher, net = views(student, distillation)
    cols = net.cols if isinstance(net, JointView) else slice(None)
    h = noisy_input(net, tokens, time_warp(net).t(tau_s), keys, given=given, factor=factor)
    teacher_denoiser = None if teacher is None else (lambda h, tau: denoiser(teacher, h, tau))
    objective = distillation.objective
    target = distill_targets(net, teacher_denoiser, h, tokens, times, keys, objective, given)
    return cross_entropy(student(h[..., cols], tau_s, tau_t, keys=keys), target, given)


# -----------------------------------------------------------------------------
# the samplers (METHOD.md 4, 7, 8, 16): one loop over the time grid; a step takes a denoiser, optionally
# guided, and moves the state by the flow map, optionally with the stochastic jump and fresh noise


def guided_denoiser(model, h, tau_s, tau_t, guide=None):
    """D at h; guide = (weak_model, eta): autoguidance D_weak + eta (D - D_weak), affine in D so the step stays
    exact (METHOD.md 8). Both models read h (a JointView, as generate arranges)."""
    d = denoiser(model, h, tau_s, tau_t)
    if guide is not None:
        weak_model, eta = guide
        d = eta * d + (1 - eta) * denoiser(weak_model, h, tau_s, tau_t)
    return d


class RewardGuide(NamedTuple):
    """Reward guidance (METHOD.md 16): reward maps soft sequences (B, L, V) to (B,); scale is lambda; form
    "endpoint" or "lookahead"; iters gradient steps of scale / iters at every sampler step."""

    reward: Callable
    scale: float
    form: str = "endpoint"
    iters: int = 1


def tilt(d, guide):
    """End-point guidance: d moved by gradient ascent of the reward on its logits log d."""
    logits = d.clamp_min(torch.finfo(d.dtype).tiny).log()
    with torch.enable_grad():
        for _ in range(guide.iters):
            logits = logits.detach().requires_grad_()
            (g,) = torch.autograd.grad(guide.reward(logits.softmax(-1)).sum(), logits)
            logits = logits + guide.scale / guide.iters * g
    return logits.detach().softmax(-1)


def lookahead_grad(model, h, tau_s, reward):
    """The gradient in the state h of r(delta_{s,1}(h)) (D_s(h) for an FLM), through the network."""
    with torch.enable_grad():
        h = h.detach().requires_grad_()
        tau_1 = torch.ones_like(tau_s) if unwrap(model).config.two_time else None
        return torch.autograd.grad(reward(denoiser(model, h, tau_s, tau_1)).sum(), h)[0]


def lookahead_step(model, h, s, tau_s, guide, gram):
    """Look-ahead guidance: h moves along the x-space gradient of r(delta_{s,1}(h)) by the trust-region length
    scale / iters * (1 - s) sqrt(L D); in the projected state that step is g_h E^T E (gram)."""
    g = lookahead_grad(model, h, tau_s, guide.reward).float()
    with torch.autocast(h.device.type, enabled=False):
        step = g @ gram
    norm = (step * g).sum((1, 2)).clamp_min(1e-30).sqrt().view(-1, 1, 1)
    width = unwrap(model).config.n_embd  # D
    length = guide.scale / guide.iters * (1 - s) * math.sqrt(h.size(1) * width)
    return h + length * step / norm


def stochastic_jump(t, gamma):
    """The stochastic sampler's jump time t~ = 1 - (1 - t) sqrt(1 - gamma^2) (METHOD.md 7)."""
    return 1 - (1 - t) * math.sqrt(1 - gamma**2)


def final_tokens(d, temperature=0.0, top_p=1.0, keys=None):
    """The tokens (B, L) of the last denoiser d: its argmax at temperature 0, else a draw from d^(1/T) on the
    nucleus top_p, in float64 by the inverse CDF of a uniform keyed by row (METHOD.md 11)."""
    if temperature == 0:
        return d.argmax(dim=-1)
    if keys is None:
        raise ValueError("temperature > 0 needs the rows' keys")
    L, keys = d.size(1), keys.to(d.device)
    u = row_uniform(keys, L, stream("final", 0)).double()
    u += (row_uniform(keys, L, stream("final", 1)).double() - 0.5) * 2.0**-24  # 48 bits: float64
    out = torch.empty(d.shape[:2], dtype=torch.long, device=d.device)
    for b in range(len(d)):  # a row at a time: the float64 sort of (L, V)
        p = (d[b].double().clamp_min(1e-300).log() / temperature).softmax(-1)
        p, order = p.sort(dim=-1, descending=True, stable=True)  # ties in argmax's order
        p = p * (p.cumsum(-1) - p < top_p)  # the nucleus: predecessors hold less than top_p
        cdf = p.cumsum(-1)
        j = (cdf < u[b, :, None] * cdf[:, -1:]).sum(-1).clamp_max(p.size(-1) - 1)
        out[b] = order.gather(-1, j[:, None])[:, 0]
    return out


class SamplerOptions(NamedTuple):
    """How sample() steps and decodes: gamma > 0 the stochastic sampler, its noise from the rows' keys (METHOD.md
    7); guide = (weak_model, eta) autoguidance (METHOD.md 8); reward a RewardGuide (METHOD.md 16); temperature
    and top_p the final draw (final_tokens)."""

    gamma: float = 0.0
    guide: tuple | None = None
    reward: RewardGuide | None = None
    temperature: float = 0.0
    top_p: float = 1.0


@torch.no_grad()
def sample(model, h, steps, cond=None, keys=None, progress=None, **options):
    """Tokens (B, L) from the noise h = x_0 @ E: the Euler ODE of a denoiser, the flow map of a two-time model
    (METHOD.md 4, 7). cond = (given, tokens): conditioning; keys: the rows' keys; progress: a tqdm bar;
    options: SamplerOptions' fields."""
    gamma, guide, reward, temperature, top_p = SamplerOptions(**options)
    net = unwrap(model)
    two_time = net.config.two_time
    warp = time_warp(net)
    if gamma > 0 and (not two_time or keys is None):
        raise ValueError("gamma > 0 needs a flow-map (two-time) model and the rows' keys")
    given, tokens = cond if cond is not None else (None, None)
    clean = None if cond is None else clean_state(net, tokens)
    h = clamp_given(h, given, clean)
    lookahead = reward is not None and reward.scale != 0 and reward.form == "lookahead"
    endpoint = reward is not None and reward.scale != 0 and reward.form == "endpoint"
    gram = net.embed.T.float() @ net.embed.float() if lookahead else None  # once per run
    taus = torch.linspace(0, 1, steps + 1, device=h.device)
    ts = warp.t(taus)
    for i in range(steps):
        s, t = ts[i], ts[i + 1]
        t_jump = stochastic_jump(t, gamma) if gamma > 0 else t
        tau_s = taus[i].expand(len(h))
        tau_t = warp.tau(t_jump) if gamma > 0 else taus[i + 1]
        tau_t = tau_t.expand(len(h)) if two_time else None
        for _ in range(reward.iters if lookahead else 0):
            h = clamp_given(lookahead_step(model, h, s, tau_s, reward, gram), given, clean)
        d = guided_denoiser(model, h, tau_s, tau_t, guide)
        d = tilt(d, reward) if endpoint else d
        d_h = net.project(d)
        if gamma > 0:  # to t~ by the flow map, back to t's noise level by fresh noise (METHOD.md 7)
            noise = draw_noise(net, keys, h.size(1), 1 + i)
            h = flow_map(h, d_h, s, t_jump) + (t - t_jump) * d_h + gamma * (1 - t) * noise
        else:
            h = flow_map(h, d_h, s, t)
        h = clamp_given(h, given, clean)
        if progress is not None:
            progress.update()
    out = final_tokens(d, temperature, top_p, keys)  # the last step lands on t = 1, where x = d
    return out if given is None else torch.where(given, tokens, out)


def generate(model, num_samples, L, steps, batch_size=64, seed=0, cond=None, **options):
    """num_samples sequences (num_samples, L); sample i from the key (seed, 0, i), whatever the batch size.
    cond = (given, tokens), (num_samples, L) or (L,); options: sample's. A weak model with another E reads the
    same x through the joint state."""
    guide = options.pop("guide", None)
    if guide is not None and not torch.equal(unwrap(model).embed, unwrap(guide[0]).embed):
        model, weak_model = joint_views(model, guide[0])
        guide = (weak_model, guide[1])
    if cond is not None:
        cond = tuple(c.expand(num_samples, L) for c in cond)
    device = unwrap(model).embed.device
    out = []
    for start in range(0, num_samples, batch_size):
        rows = slice(start, min(start + batch_size, num_samples))
        keys = to_device(slot_keys(seed, 0, range(rows.start, rows.stop)), device)
        rows_cond = None if cond is None else (cond[0][rows], cond[1][rows])
        h = draw_noise(model, keys, L)
        out.append(sample(model, h, steps, rows_cond, keys=keys, guide=guide, **options))
    return torch.cat(out)


def factorized_sample(model, num_samples, L, batch_size=64, seed=0):
    """The one-step control (METHOD.md 13): each position drawn independently from the model's marginal
    D(x_0, tau = 0), what a discrete diffusion sampler does in one step; (num_samples, L)."""
    net = unwrap(model)
    device = net.embed.device
    out = []
    for start in range(0, num_samples, batch_size):
        keys = to_device(
            slot_keys(seed, 0, range(start, min(start + batch_size, num_samples))), device
        )
        tau = torch.zeros(len(keys), device=device)
        p = denoiser(net, draw_noise(net, keys, L), tau, tau if net.config.two_time else None)
        out.append(final_tokens(p, temperature=1.0, keys=keys))  # its own stream, not the noise's
    return torch.cat(out)
