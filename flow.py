"""
The method's mathematics as plain functions (METHOD.md), shared by training, distillation, sampling and
evaluation: the time warp, the noise and the projected state, the interpolant, the losses, conditioning, the flow
map, the semigroup / Lagrangian / Eulerian targets, and the samplers. The network is model.py; every function here
takes it as an argument (bare, DDP-wrapped or compiled) and works on the projected state h = x @ E of METHOD.md 14;
DenseView runs the same functions on the dense (B, L, V) state, the reference that the tests compare against.

Times: flow maps take (x_s, s, t) with s <= t in physical time; the network is fed the reparameterized tau.
"""

import math
from contextlib import contextmanager
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import DECODE, GIVEN, NOISE, row_key, row_normal, row_uniform, slot_keys, unwrap

# -----------------------------------------------------------------------------
# the flow math: time warp (METHOD.md 3)


def _interp(x, xp, fp):
    """Piecewise-linear interpolation of the increasing table (xp, fp) at x, on x's device, no host sync."""
    x64 = x.double().clamp(0.0, 1.0)
    i = torch.searchsorted(xp, x64, right=True).clamp(1, len(xp) - 1)
    w = (x64 - xp[i - 1]) / (xp[i] - xp[i - 1])
    return (fp[i - 1] + w * (fp[i] - fp[i - 1])).to(x.dtype)


def quadrature(rule):
    """Nodes z and weights w with sum w f(z) ~ E_{z~N(0,1)} f(z), float64 (METHOD.md 3): "exact", the
    trapezoid rule on 801 points of [-10, 10]; "authors", 100 Gauss-Hermite nodes, their models' rule."""
    if rule == "authors":
        nodes, weights = np.polynomial.hermite.hermgauss(100)
        z = torch.from_numpy(nodes * math.sqrt(2))
        w = torch.from_numpy(weights / math.sqrt(math.pi))
        return z, w
    z = torch.linspace(-10, 10, 801, dtype=torch.float64)
    return z, torch.exp(-(z**2) / 2) / math.sqrt(2 * math.pi) * (z[1] - z[0])


class TimeWarp:
    """tau(t) = (q(t) - 1/V) / (1 - 1/V), q the argmax decoding rate of x_t (METHOD.md 3), and d tau / dt in closed
    form under the same quadrature rule ("exact" or "authors"), tabulated once on a uniform grid of t."""

    def __init__(self, vocab_size, rule="exact", n_grid=10_000):
        V = vocab_size
        z, w = quadrature(rule)
        t = torch.linspace(0, 1, n_grid + 1, dtype=torch.float64)[:-1]
        m = t / (1 - t)
        y = z + m[:, None]  # (n_grid, n_quad)
        # P_e = 1 - q = E[1 - Phi(z + m)^(V-1)], with expm1 so that tiny error rates keep their precision
        log_cdf = torch.special.log_ndtr(y)
        p_err = (w * -torch.expm1((V - 1) * log_cdf)).sum(-1)
        tau = 1 - V / (V - 1) * p_err
        # dq/dm = E[(V-1) Phi(y)^(V-2) phi(y)], in log space; dm/dt = 1 / (1 - t)^2
        log_dq = math.log(V - 1) + (V - 2) * log_cdf - y**2 / 2 - 0.5 * math.log(2 * math.pi)
        dtau = V / (V - 1) * (w * log_dq.exp()).sum(-1) / (1 - t) ** 2
        # tau can dip below 0 by rounding near t = 0, and near t = 1 the error rate underflows so tau is 1.0 in
        # float64: keep the strictly increasing points, then (1, 1),
        # where d tau / dt is 0 (the error rate vanishes faster than any power of 1 - t)
        tau[0] = 0.0
        rising = torch.cat([torch.tensor([True]), tau[1:] > torch.cummax(tau, 0).values[:-1]])
        keep = rising & (tau < 1.0)
        one, zero = torch.ones(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
        self.t_table, self.tau_table = torch.cat([t[keep], one]), torch.cat([tau[keep], one])
        self.dtau_table = torch.cat([dtau[keep], zero])
        self._tables = {}

    def _on(self, device):
        if device not in self._tables:
            tables = (self.t_table, self.tau_table, self.dtau_table)
            self._tables[device] = tuple(table.to(device) for table in tables)
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
    """The TimeWarp a model was trained under (its vocabulary size and config.time_warp), tabulated once."""
    cfg = unwrap(model).config
    key = (cfg.vocab_size, cfg.time_warp)
    if key not in _warps:
        _warps[key] = TimeWarp(*key)
    return _warps[key]


def stratified_tau(n, generator):
    """n stratified tau ~ U(0, 1), randomly permuted: tau_i = (u + i) / n (METHOD.md 3); slice it per rank."""
    u = torch.rand((), generator=generator, dtype=torch.float64)
    tau = (u + torch.arange(n, dtype=torch.float64)) / n
    return tau[torch.randperm(n, generator=generator)].float()


# -----------------------------------------------------------------------------
# the flow math: interpolant, denoiser, flow map, semigroup (METHOD.md 1, 2, 4, 5)


@contextmanager
def ieee_fp32():
    """fp32 matrix products in full IEEE fp32 inside, whatever the global setting (TF32 on CUDA, which
    trainer.Run turns on for the transformer; bf16 in the CPU's oneDNN under set_float32_matmul_precision).
    torch 2.9 and newer name the setting fp32_precision; older ones have only CUDA's allow_tf32."""
    flags = [
        (getattr(getattr(torch.backends, name, None), "matmul", None), "fp32_precision", "ieee")
        for name in ("cuda", "mkldnn")
    ]
    flags = [f for f in flags if hasattr(f[0], f[1])] or [
        (torch.backends.cuda.matmul, "allow_tf32", False)
    ]
    saved = [getattr(obj, name) for obj, name, _ in flags]
    for obj, name, value in flags:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for (obj, name, _), value in zip(flags, saved):
            setattr(obj, name, value)


def noise_factor(embed):
    """C (D, D) with C C^T = E^T E, so that z C^T ~ x_0 @ E for z ~ N(0, I_D) (METHOD.md 14). E^T E is the
    noise's covariance, so it is a full fp32 product (a 10-bit TF32 mantissa would change it); the D x D
    factorization is in float64. At V = 50,257, D = 768 the product and its backward are 1.8e11 FLOPs."""
    with torch.autocast(embed.device.type, enabled=False), ieee_fp32():
        gram = embed.T @ embed
    # cholesky_ex: no error check, so no host sync; a non-finite E gives a non-finite factor, which the loop's
    # finite check then reports
    return torch.linalg.cholesky_ex(gram.double()).L.to(embed.dtype)


def joint_noise_factor(embed):
    """W (D', D') with W^T W = E^T E for an E (V, D') whose columns may be dependent (a student's E that starts
    as its teacher's): W = Q^T E with Q an orthonormal basis of E's columns, so x_0 @ E = (x_0 @ Q) W with
    x_0 @ Q ~ N(0, I). Q is held without gradient, which keeps E's gradient unbiased (METHOD.md 14); float64
    resolves the nearly dependent directions."""
    with torch.no_grad():
        e = embed.double()
        lam, U = torch.linalg.eigh(e.T @ e)
        kept = lam > lam.max() * 1e-10  # the dependent directions dropped
        inv_sqrt = torch.where(kept, lam.clamp_min(1e-300).rsqrt(), torch.zeros_like(lam))
        Q = (e @ (U * inv_sqrt)).to(embed.dtype)
    with torch.autocast(embed.device.type, enabled=False), ieee_fp32():
        return Q.T @ embed


def state_factor(model):
    """F (D', D') with z @ F ~ x_0 @ E for z ~ N(0, I), the noise of the state the model reads: C^T of noise_factor,
    or W of joint_noise_factor for a JointView; None when V <= D (then x_0 itself is drawn). A training step
    computes it once for all its micro-steps (train_flm.py)."""
    model = unwrap(model)
    if isinstance(model, DenseView) or model.embed.size(0) <= model.embed.size(1):
        return None
    if isinstance(model, JointView):
        return joint_noise_factor(model.embed)
    return noise_factor(model.embed).T


class JointView(nn.Module):
    """Two DiTs with input matrices of their own read one state h = x @ [E_a, E_b], each its own columns: a
    teacher and a student that trains its E, or a model and its weaker guide (METHOD.md 14)."""

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


class DenseView(nn.Module):
    """A DiT that reads the dense state x (B, L, V) itself, the authors' formulation: its state space is R^V (E = I,
    never formed), and it projects x @ E inside. The functions here run it as they run a DiT (clean_state,
    state_factor and the look-ahead step know its E = I); the tests and bench.py compare against it."""

    def __init__(self, net):
        super().__init__()
        self.net, self.config = net, unwrap(net).config

    def project(self, x):
        return x.float()

    def noise(self, keys, L, stream):
        """x_0 (B, L, V) as the authors draw it, torch.randn, from a generator seeded by each row's key."""
        V, device = self.config.vocab_size, keys.device
        seeds = [row_key(int(k), stream, 0) for k in keys.tolist()]
        return torch.stack(
            [
                torch.randn(L, V, device=device, generator=torch.Generator(device).manual_seed(s))
                for s in seeds
            ]
        )

    def forward(self, x, *args, **kwargs):
        return self.net(unwrap(self.net).project(x), *args, **kwargs)


def clean_state(model, tokens):
    """x_1 @ E = one_hot(tokens) @ E = E[tokens], the clean state of tokens (B, L) in the model's state space."""
    model = unwrap(model)
    if isinstance(model, DenseView):
        return F.one_hot(tokens, model.config.vocab_size).float()
    return model.embed[tokens]


def draw_noise(model, keys, L, stream=NOISE, factor=None):
    """The projected noise x_0 @ E (B, L, D) of rows with keys (B,), drawn as z @ factor (state_factor's, computed
    here if not given) without forming x_0 ~ N(0, I) (B, L, V). Always fp32, also under autocast."""
    model = unwrap(model)
    keys = keys.to(next(model.parameters()).device)
    if isinstance(model, DenseView):
        return model.noise(keys, L, stream)
    factor = state_factor(model) if factor is None else factor
    B, V = len(keys), model.config.vocab_size
    if factor is None:  # E^T E is singular (a tiny vocabulary), or the state is x itself: draw x_0
        return model.project(row_normal(keys, L * V, stream).view(B, L, V))
    with torch.autocast(keys.device.type, enabled=False):
        return row_normal(keys, L * factor.size(0), stream).view(B, L, -1) @ factor


def interpolate(x0, x1, t):
    """x_t = (1 - t) x_0 + t x_1 (METHOD.md 1); t (B,) broadcast over the trailing dims."""
    t = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * x1


def noisy_input(model, tokens, t, keys, given=None, factor=None):
    """The network input h_t = x_t @ E for tokens (B, L) at times t (B,), noise from the rows' keys -> (B, L, D).
    given (B, L) bool: positions fed clean, x_1 = one_hot(token), at every time (conditioning)."""
    model = unwrap(model)
    x0 = draw_noise(model, keys, tokens.size(1), factor=factor)
    x1 = clean_state(model, tokens)
    return clamp_given(interpolate(x0, x1, t), given, x1)


def flm_loss(model, tokens, tau, keys, given=None, factor=None):
    """Token cross-entropy of the denoiser at reparameterized times tau (B,) (METHOD.md 2); keys (B,) give each
    row its noise and dropout. given (B, L): positions fed clean and left out of the loss (conditioning). factor:
    the step's state_factor, computed once for all its micro-steps."""
    keys = keys.to(tokens.device)
    h = noisy_input(model, tokens, time_warp(model).t(tau), keys, given, factor)
    return cross_entropy(model(h, tau, keys=keys), tokens, given)


def cross_entropy(logits, target, given=None):
    """-sum_V target * log_softmax(logits) per position, target token ids (B, L) or distributions (B, L, V), in fp32;
    mean over positions (METHOD.md 2, 6), or over each row's free ones."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 (float64 stays)
    target = target.to(logits.dtype) if target.is_floating_point() else target
    ce = F.cross_entropy(logits.flatten(0, 1), target.flatten(0, 1), reduction="none")  # (B L,)
    ce = ce.view(logits.shape[:2])
    return ce.mean() if given is None else free_mean(ce, given)


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
    """tau_s, tau_t (n,) and n_diag of a distillation batch of n rows in micro-batches of `block` rows
    (METHOD.md 6): the first n_diag = round(diag_frac block) rows of each micro-batch diagonal (fixed shapes every
    step), round(boundary_frac x the others) of the other rows at (0, 1), the rest off-diagonal."""
    block = block or n
    n_diag = round(block * diag_frac)
    diag = torch.arange(n) % block < n_diag
    u, d, tau = torch.rand(3, n, generator=generator)
    others = (~diag).nonzero()[:, 0]
    boundary = torch.zeros(n, dtype=torch.bool)
    boundary[
        others[
            torch.randperm(len(others), generator=generator)[: round(len(others) * boundary_frac)]
        ]
    ] = True
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
    f = lambda h, a, b: net(h, a, b, attention="explicit").float().softmax(dim=-1)
    return torch.func.jvp(f, (h, tau_s, tau_t), (dh, dtau_s, dtau_t))


@torch.no_grad()
def lagrangian_target(student, teacher_denoiser, h_s, tau_s, tau_t, given=None, clean=None):
    """The Lagrangian target from the student (stop-gradient) and D = teacher_denoiser(h, tau); (B, L, V)."""
    warp = time_warp(student)
    s, t = warp.t(tau_s), warp.t(tau_t)
    zero = torch.zeros_like(tau_s)
    tangent = (torch.zeros_like(h_s), zero, torch.ones_like(tau_s))  # d / d tau_t
    delta, ddelta_dtau_t = jvp_denoiser(student, h_s, tau_s, tau_t, *tangent)
    # X_{s,t}(x_s) with the student's delta
    X = clamp_given(flow_map(h_s, unwrap(student).project(delta), s, t), given, clean)
    ddelta_dt = ddelta_dtau_t * warp.dtau_dt(t).view(-1, 1, 1)
    return lagrangian(teacher_denoiser(X, tau_t), ddelta_dt, s, t)


# the Eulerian target is evaluated at t' = min(t, EULERIAN_T_MAX) (METHOD.md 6)
EULERIAN_T_MAX = 1 - 1e-3


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
    tangent = (dh, (1 - s) * warp.dtau_dt(s), torch.zeros_like(tau_t))
    _, directional = jvp_denoiser(student, h_s, tau_s, tau_t, *tangent)
    return eulerian(D_s, directional, s, t)


def onto_simplex(v):
    """The Euclidean projection of v (..., V) onto the probability simplex, the nearest point of it (sparsemax's):
    max(v - theta, 0) with theta the one threshold that makes it sum to 1. The Lagrangian and Eulerian targets are
    not convex combinations and can leave the simplex, where the soft cross-entropy is unbounded (METHOD.md 6)."""
    u = v.sort(dim=-1, descending=True).values
    excess = u.cumsum(-1) - 1  # sum of the k largest, minus 1
    k = torch.arange(1, v.size(-1) + 1, device=v.device, dtype=v.dtype)
    support = (u - excess / k > 0).sum(-1, keepdim=True)  # how many stay positive: a prefix of u
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
    if D is None:  # self-distillation: the student's own delta_{s,s}
        D = lambda h, tau: denoiser(net, h, tau, tau)
    args = (h[n:], tau_s[n:], tau_t[n:])
    fix = {} if given is None else dict(given=given[n:], clean=clean_state(net, tokens[n:]))
    if objective == "semigroup":
        tau_u = (tau_s[n:] + tau_t[n:]) / 2
        off = semigroup_target(net, *args[:2], tau_u, args[2], keys[n:], **fix)
    elif objective == "lagrangian":
        off = onto_simplex(lagrangian_target(net, D, *args, **fix))
    else:
        off = onto_simplex(eulerian_target(net, D, *args, **fix))
    return torch.cat([diagonal, off])


def reading(student, teacher):
    """(teacher, student) as they read the distillation state: a student with a frozen E reads the teacher's
    h = x_s @ E; one that trains its E reads its own columns of the joint state x_s @ [E_teacher, E_student]."""
    net = unwrap(student)
    if teacher is not None and net.embed.requires_grad:
        return joint_views(teacher, net)
    return teacher, net


def distill_loss(
    student, teacher, tokens, times, keys, objective="semigroup", given=None, factor=None
):
    """Flow-map distillation loss (METHOD.md 6): soft cross-entropy of the student's delta_{s,t}(x_s) against
    distill_targets; times = (tau_s, tau_t, n_diag); teacher None: self-distillation; given (B, L): positions kept
    clean and out of the loss; factor: the step's state_factor of the student's reading."""
    keys, (tau_s, tau_t) = keys.to(tokens.device), times[:2]
    teacher, net = reading(student, teacher)
    cols = net.cols if isinstance(net, JointView) else slice(None)
    h = noisy_input(net, tokens, time_warp(net).t(tau_s), keys, given=given, factor=factor)
    D = None if teacher is None else (lambda h, tau: denoiser(teacher, h, tau))
    target = distill_targets(net, D, h, tokens, times, keys, objective, given)
    return cross_entropy(student(h[..., cols], tau_s, tau_t, keys=keys), target, given)


# -----------------------------------------------------------------------------
# the samplers (METHOD.md 4, 7, 8): one loop over the time grid; each step asks for a denoiser, optionally
# autoguided, and moves the state by the flow map, optionally with the stochastic jump and fresh noise


def guided_denoiser(model, x, tau_s, tau_t, guide=None):
    """D (B, L, V) at state x; guide = (weak_model, eta): autoguidance D_weak + eta (D - D_weak) (METHOD.md 8), affine
    in D, so the step stays exact. Both models must read x (JointView, as generate arranges)."""
    d = denoiser(model, x, tau_s, tau_t)
    if guide is not None:
        weak_model, eta = guide
        d = eta * d + (1 - eta) * denoiser(weak_model, x, tau_s, tau_t)
    return d


class RewardGuide(NamedTuple):
    """Reward guidance (METHOD.md 16): reward maps soft sequences (B, L, V) to (B,); scale is lambda; form
    "endpoint" or "lookahead"; iters gradient steps of scale / iters each, at every sampler step."""

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


def lookahead_grad(model, h, tau_s, reward):
    """The gradient in the state h of r(delta_{s,1}(h)) (D_s(h) for an FLM), carried back through the network."""
    with torch.enable_grad():
        h = h.detach().requires_grad_()
        tau_1 = torch.ones_like(tau_s) if unwrap(model).config.two_time else None
        return torch.autograd.grad(reward(denoiser(model, h, tau_s, tau_1)).sum(), h)[0]


def lookahead_step(model, x, s, tau_s, guide, gram):
    """One look-ahead step (METHOD.md 16): x moves along the x-space gradient of r(delta_{s,1}(x)) by the
    trust-region length scale / iters * (1 - s) sqrt(L D); in the projected state that step is g_h E^T E (gram)."""
    net = unwrap(model)
    g = lookahead_grad(model, x, tau_s, guide.reward).float()
    with torch.autocast(x.device.type, enabled=False):
        step = g if gram is None else g @ gram
    norm = (step * g).sum((1, 2)).clamp_min(1e-30).sqrt().view(-1, 1, 1)
    length = guide.scale / guide.iters * (1 - s) * math.sqrt(x.size(1) * net.config.n_embd)
    return x + length * step / norm


def stochastic_jump(t, gamma):
    """The stochastic flow-map sampler's jump time t~ = 1 - (1 - t) sqrt(1 - gamma^2) (METHOD.md 7)."""
    return 1 - (1 - t) * math.sqrt(1 - gamma**2)


def stochastic_step(x, lifted_d, s, t, gamma, noise):
    """The stochastic flow-map step from s to t (METHOD.md 7): the map to t~, then back to t's noise level,
    X_{s,t~}(x) + (t - t~) delta + gamma (1 - t) eps; lifted_d is delta in the state space, noise is eps."""
    t_jump = stochastic_jump(t, gamma)
    return flow_map(x, lifted_d, s, t_jump) + (t - t_jump) * lifted_d + gamma * (1 - t) * noise


def decode_tokens(d, temperature=0.0, top_p=1.0, keys=None):
    """The tokens (B, L) of the last denoiser d (B, L, V): its argmax at temperature 0, else a draw from
    d^(1/T) on the nucleus top_p, in float64 by the inverse CDF of a uniform keyed by row (METHOD.md 11)."""
    if temperature == 0:
        return d.argmax(dim=-1)
    if keys is None:
        raise ValueError("temperature > 0 needs the rows' keys")
    B, L, _ = d.shape
    u = row_uniform(keys, L, DECODE).double()
    u += (row_uniform(keys, L, DECODE + 1).double() - 0.5) * 2.0**-24  # 48 bits: a float64 uniform
    out = torch.empty(B, L, dtype=torch.long, device=d.device)
    for b in range(B):  # a row at a time: the float64 sort of (L, V)
        p = (d[b].double().clamp_min(1e-300).log() / temperature).softmax(-1)
        # stable: ties in the order argmax takes them
        p, order = p.sort(dim=-1, descending=True, stable=True)
        # the nucleus: every token whose predecessors hold less than top_p
        p = p * (p.cumsum(-1) - p < top_p)
        cdf = p.cumsum(-1)
        j = (cdf < u[b, :, None] * cdf[:, -1:]).sum(-1).clamp_max(p.size(-1) - 1)
        out[b] = order.gather(-1, j[:, None])[:, 0]
    return out


@torch.no_grad()
def sample(
    model,
    x,
    steps,
    cond=None,
    gamma=0.0,
    keys=None,
    guide=None,
    reward=None,
    progress=None,
    **decode,
):
    """Tokens (B, L) from the projected noise x = x_0 @ E of draw_noise: the Euler ODE for a denoiser, the flow
    map for a two-time model (METHOD.md 4, 7). cond = (given, tokens) (B, L): conditioning; gamma > 0: the
    stochastic sampler, its noise from the rows' keys; guide = (weak_model, eta): autoguidance; reward: a
    RewardGuide; progress: a tqdm bar, updated once a step; decode: temperature and top_p of decode_tokens."""
    net = unwrap(model)
    two_time, warp = net.config.two_time, time_warp(net)
    if gamma > 0 and (not two_time or keys is None):
        raise ValueError("gamma > 0 needs a flow-map (two-time) model and the rows' keys")
    given, clean = None, None
    if cond is not None:
        given, tokens = cond
        clean = clean_state(net, tokens)
    x = clamp_given(x, given, clean)
    guided = reward is not None and reward.scale != 0
    gram = None  # E^T E of the look-ahead step, once per run, not at every step (None: E = I)
    if guided and reward.form == "lookahead" and not isinstance(net, DenseView):
        gram = net.embed.T.float() @ net.embed.float()
    taus = torch.linspace(0, 1, steps + 1, device=x.device)
    ts = warp.t(taus)
    for i in range(steps):
        s, t = ts[i], ts[i + 1]
        t_jump = stochastic_jump(t, gamma) if gamma > 0 else t
        tau_s = taus[i].expand(x.size(0))
        tau_t = (warp.tau(t_jump) if gamma > 0 else taus[i + 1]).expand(x.size(0))
        tau_t = tau_t if two_time else None
        for _ in range(reward.iters if guided and reward.form == "lookahead" else 0):
            x = clamp_given(lookahead_step(model, x, s, tau_s, reward, gram), given, clean)
        d = guided_denoiser(model, x, tau_s, tau_t, guide)
        if guided and reward.form == "endpoint":
            d = tilt(d, reward)
        if gamma > 0:
            noise = draw_noise(net, keys, x.size(1), NOISE + 1 + i)
            x = stochastic_step(x, net.project(d), s, t, gamma, noise)
        else:
            x = flow_map(x, net.project(d), s, t)
        x = clamp_given(x, given, clean)
        if progress is not None:
            progress.update()
    out = decode_tokens(d, keys=keys, **decode)  # the last step lands on t = 1, where x = d
    return out if given is None else torch.where(given, tokens, out)


def generate(model, num_samples, L, steps, batch_size=64, seed=0, cond=None, **options):
    """num_samples sequences (num_samples, L) in batches; sample i comes from the key (seed, 0, i), whatever
    the batch size. cond = (given, tokens), (num_samples, L) or (L,); options: sample's. A weak model with another
    E reads the same x through the joint state."""
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
        rows_cond = None if cond is None else (cond[0][rows], cond[1][rows])
        out.append(sample(model, x, steps, rows_cond, keys=keys, guide=guide, **options))
    return torch.cat(out)


def factorized_sample(model, num_samples, L, batch_size=64, seed=0):
    """The one-step control (METHOD.md 13): each position drawn independently from the model's own per-position
    marginal D(x_0, tau = 0), which is what a discrete diffusion sampler does in one step. Tokens (num_samples, L)."""
    net, out = unwrap(model), []
    for start in range(0, num_samples, batch_size):
        keys = slot_keys(seed, 0, range(start, min(start + batch_size, num_samples)))
        tau = torch.zeros(len(keys), device=net.embed.device)
        tau_t = tau if net.config.two_time else None
        p = denoiser(net, draw_noise(net, keys, L), tau, tau_t)  # (B, L, V)
        u = row_uniform(keys.to(p.device), L, NOISE + 1)[
            ..., None
        ]  # inverse CDF, one uniform per position
        idx = (p.cumsum(-1) < u * p.sum(-1, keepdim=True)).sum(-1)
        out.append(idx.clamp_max(p.size(-1) - 1))
    return torch.cat(out)
