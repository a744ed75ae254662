"""The mathematics of METHOD.md, checked on small seeded tensors (CPU, seconds). METHOD.md 17 maps every rule to
its test."""

import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from flow import (
    ieee_fp32,
    TimeWarp,
    cross_entropy,
    denoiser,
    draw_noise,
    factorized_sample,
    flm_loss,
    generate,
    flow_map,
    given_mask,
    interpolate,
    joint_noise_factor,
    joint_views,
    noise_factor,
    noisy_input,
    onto_simplex,
    sample,
    state_factor,
    semigroup_target,
    semigroup_weight,
    stratified_tau,
    time_warp,
)
from model import MODEL_PRESETS, DiT, DiTConfig, attention
from rng import row_normal, row_uniform, slot_keys


class DenseView(nn.Module):
    """The authors' formulation, the reference of the projected state: a DiT on the dense state x (B, L, V), which
    is flow.py's functions with E = I (x @ E is then inside the network)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.config = net, net.config
        self.register_buffer("embed", torch.eye(net.config.vocab_size, device=net.embed.device))

    def project(self, x):
        return x.float()

    def forward(self, x, *args, **kwargs):
        return self.net(self.net.project(x), *args, **kwargs)


def tiny_model(V=64, seed=0, two_time=False, perturb=True):
    """A tiny DiT; perturb gives its zero-initialized layers random weights so that it depends on its input."""
    torch.manual_seed(seed)
    model = DiT(DiTConfig(vocab_size=V, two_time=two_time, **MODEL_PRESETS["tiny"]))
    if perturb:
        for name, p in model.named_parameters():
            if "adaLN" in name or "final_layer.linear" in name or "t2_embedder" in name:
                torch.nn.init.normal_(p, std=0.3)
    return model.eval()


# -----------------------------------------------------------------------------
# simplex


def test_denoiser_and_semigroup_target_lie_on_the_simplex():
    model = tiny_model(two_time=True)
    h = draw_noise(model, slot_keys(0, 0, range(4)), 8)
    tau_s = torch.tensor([0.0, 0.1, 0.5, 0.3])
    tau_t = torch.tensor([1.0, 0.9, 0.7, 0.31])
    d = denoiser(model, h, tau_s, tau_t)
    assert (d >= 0).all()
    torch.testing.assert_close(d.sum(-1), torch.ones(4, 8), atol=1e-5, rtol=0)
    target = semigroup_target(model, h, tau_s, tau_s / 2 + tau_t / 2, tau_t)
    assert (target >= 0).all()
    torch.testing.assert_close(target.sum(-1), torch.ones(4, 8), atol=1e-5, rtol=0)


def test_semigroup_weight_is_in_unit_interval_and_matches_its_complement():
    s = torch.rand(1000, dtype=torch.float64) * 0.9
    t = s + (1 - s) * torch.rand(1000, dtype=torch.float64) * 0.99 + 1e-3
    u = s + (t - s) * torch.rand(1000, dtype=torch.float64)
    g = semigroup_weight(s, u, t)
    assert ((g >= 0) & (g <= 1)).all()
    one_minus_g = (t - u) * (1 - s) / ((1 - u) * (t - s))  # METHOD.md 5
    torch.testing.assert_close(1 - g, one_minus_g, atol=1e-10, rtol=0)


# -----------------------------------------------------------------------------
# interpolant and velocity


def test_interpolant_endpoints_are_noise_and_data():
    x0, x1 = torch.randn(3, 5, 7), F.one_hot(torch.randint(7, (3, 5)), 7).float()
    torch.testing.assert_close(interpolate(x0, x1, torch.zeros(3)), x0)
    torch.testing.assert_close(interpolate(x0, x1, torch.ones(3)), x1)


def test_velocity_with_true_data_is_the_interpolant_derivative():
    x0, x1 = (
        torch.randn(3, 5, 7, dtype=torch.float64),
        F.one_hot(torch.randint(7, (3, 5)), 7).double(),
    )
    t, eps = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64), 1e-6
    xt = interpolate(x0, x1, t)
    velocity = (x1 - xt) / (1 - t.view(-1, 1, 1))  # b_t = (D - x) / (1 - t) with D = x_1
    derivative = (interpolate(x0, x1, t + eps) - interpolate(x0, x1, t - eps)) / (2 * eps)
    torch.testing.assert_close(velocity, derivative, atol=1e-8, rtol=0)


def test_euler_step_equals_flow_map_with_the_denoiser():
    x, d = torch.randn(2, 3, 5), torch.rand(2, 3, 5)
    s, t = torch.tensor(0.3), torch.tensor(0.55)
    torch.testing.assert_close(flow_map(x, d, s, t), x + (t - s) * (d - x) / (1 - s))


# -----------------------------------------------------------------------------
# time warp (METHOD.md 3)


def test_time_warp_endpoints_monotone_and_inverse():
    warp = TimeWarp(1000)
    t = torch.linspace(0, 1, 2001, dtype=torch.float64)
    tau = warp.tau(t)
    assert tau[0] == 0 and tau[-1] == 1
    assert (warp.tau_table[1:] > warp.tau_table[:-1]).all()
    inner = (tau > 1e-6) & (tau < 1 - 1e-9)  # where tau is not flat in float64
    torch.testing.assert_close(warp.t(tau)[inner], t[inner], atol=1e-6, rtol=0)


@pytest.mark.parametrize("V", [2, 16, 1000])
def test_time_warp_matches_monte_carlo_argmax_decoding_rate(V):
    warp, g, n = TimeWarp(V), torch.Generator().manual_seed(V), 20_000
    for t in (0.3, 0.6, 0.8):
        x = interpolate(
            torch.randn(n, 1, V, generator=g),
            F.one_hot(torch.zeros(n, 1, dtype=torch.long), V).float(),
            torch.full((n,), t),
        )
        q_mc = (x.argmax(-1) == 0).double().mean()
        q = warp.tau(torch.tensor(t, dtype=torch.float64)) * (1 - 1 / V) + 1 / V
        assert abs(q - q_mc) < 4 * math.sqrt(q * (1 - q) / n) + 1e-4, (V, t, float(q), float(q_mc))


def test_time_warp_reference_values():
    warp = TimeWarp(50257)
    tau = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    torch.testing.assert_close(
        warp.t(tau),
        torch.tensor([0.744, 0.779, 0.809, 0.831, 0.848], dtype=torch.float64),
        atol=1e-3,
        rtol=0,
    )
    assert abs(float(TimeWarp(30522).t(torch.tensor(0.5, dtype=torch.float64))) - 0.805) < 1e-3


def legendre_tau(V, t):
    """tau(t) by another rule than TimeWarp's: 600-node Gauss-Legendre on [-12, 12] (float64)."""
    nodes, weights = np.polynomial.legendre.leggauss(600)
    z, w = (
        torch.tensor(nodes * 12),
        torch.tensor(weights * 12) * torch.exp(-(torch.tensor(nodes * 12) ** 2) / 2),
    )
    p_err = (
        w
        / math.sqrt(2 * math.pi)
        * -torch.expm1((V - 1) * torch.special.log_ndtr(z + (t / (1 - t))[:, None]))
    )
    return 1 - V / (V - 1) * p_err.sum(-1)


@pytest.mark.parametrize("V", [16, 1000, 50257])
def test_time_warp_matches_an_independent_quadrature(V):
    t = torch.rand(4000, generator=torch.Generator().manual_seed(V), dtype=torch.float64) * 0.9999
    torch.testing.assert_close(TimeWarp(V).tau(t), legendre_tau(V, t), atol=1e-6, rtol=0)


@pytest.mark.parametrize("V", [16, 50257])
def test_dtau_dt_is_the_derivative_of_tau(V):
    t, h = torch.linspace(0.02, 0.98, 97, dtype=torch.float64), 1e-5
    fd = (legendre_tau(V, t + h) - legendre_tau(V, t - h)) / (2 * h)
    dtau = TimeWarp(V).dtau_dt(t)
    assert fd.max() > 1  # the steep part of the warp is among the points
    torch.testing.assert_close(dtau, fd, atol=1e-5 * fd.max().item(), rtol=1e-5)


# -----------------------------------------------------------------------------
# the Euclidean projection onto the simplex (the Lagrangian and Eulerian targets, METHOD.md 6)


def test_projection_onto_the_simplex_sums_to_one_is_nonnegative_and_fixes_the_simplex():
    g = torch.Generator().manual_seed(2)
    v = 3 * torch.randn(50, 7, 40, generator=g, dtype=torch.float64)
    p = onto_simplex(v)
    assert (p >= 0).all() and (p == 0).any()
    torch.testing.assert_close(
        p.sum(-1), torch.ones(50, 7, dtype=torch.float64), atol=1e-12, rtol=0
    )
    q = torch.randn(50, 7, 40, generator=g, dtype=torch.float64).softmax(-1)
    torch.testing.assert_close(onto_simplex(q), q, atol=1e-12, rtol=0)


def test_projection_onto_the_simplex_is_the_nearest_point_of_it():
    n = 300  # every point of the 2-simplex with coordinates in multiples of 1 / n
    i, j = torch.meshgrid(torch.arange(n + 1), torch.arange(n + 1), indexing="ij")
    keep = i + j <= n
    grid = torch.stack([i[keep], j[keep], n - i[keep] - j[keep]], -1).double() / n  # (P, 3)
    v = 1.5 * torch.randn(200, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    p = onto_simplex(v)
    nearest = torch.cdist(v, grid).min(-1).values
    assert ((v - p).norm(dim=-1) <= nearest + 1e-12).all()  # no point of the simplex is closer
    assert (
        (v - p).norm(dim=-1) >= nearest - 1 / n
    ).all()  # and the grid's nearest point is within its spacing
    clipped = v.clamp_min(0) / v.clamp_min(0).sum(
        -1, keepdim=True
    )  # clip and renormalize: not the projection
    assert ((v - clipped).norm(dim=-1) > (v - p).norm(dim=-1) + 1e-3).any()


def test_stratified_tau_has_one_draw_per_stratum():
    tau = stratified_tau(64, torch.Generator().manual_seed(0))
    assert sorted((tau * 64).floor().long().tolist()) == list(range(64))


# -----------------------------------------------------------------------------
# the exact denoiser of a finite data set: sampler, flow map, semigroup


def exact_denoiser(data, x, t):
    """E[x_1 | x_t = x] for x_1 uniform over the one-hot sequences data (K, L, V): x (B, L, V), t scalar."""
    X = data.to(x.dtype)
    logits = (
        t / (1 - t) ** 2 * torch.einsum("blv,klv->bk", x, X)
    )  # log N(x; t X_k, (1-t)^2 I) + const
    return torch.einsum("bk,klv->blv", logits.softmax(-1), X)


def exact_flow_map(data, x, s, t, n=4000):
    """X_{s,t}(x) by fine Euler integration of the exact probability-flow ODE."""
    for i in range(n):
        a, b = s + (t - s) * i / n, s + (t - s) * (i + 1) / n
        x = flow_map(x, exact_denoiser(data, x, a), a, b)
    return x


def phrase_data(K=4, L=3, V=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.one_hot(torch.randint(V, (K, L), generator=g), V).double()  # (K, L, V)


def test_euler_sampler_with_exact_denoiser_returns_data_sequences():
    data, warp, B = phrase_data(), TimeWarp(8), 400
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 3, 8, generator=g, dtype=torch.float64)
    ts = warp.t(torch.linspace(0, 1, 201, dtype=torch.float64))
    for i in range(200):  # METHOD.md 4 with the exact denoiser
        d = exact_denoiser(data, x, ts[i])
        x = flow_map(x, d, ts[i], ts[i + 1])
    tokens, seqs = x.argmax(-1), data.argmax(-1)
    in_data = (tokens[:, None, :] == seqs[None]).all(-1).any(-1)
    assert in_data.double().mean() >= 0.99


def test_flow_map_is_identity_at_equal_times():
    x, d = torch.randn(2, 3, 5), torch.rand(2, 3, 5)
    for s in (0.0, 0.4, 0.9):
        torch.testing.assert_close(flow_map(x, d, torch.tensor(s), torch.tensor(s)), x)


def test_exact_flow_map_satisfies_the_semigroup_in_delta_form():
    data = phrase_data()
    x = torch.randn(16, 3, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    s, u, t = 0.2, 0.45, 0.7

    def delta(x, s, t):  # invert X_{s,t}(x) = ((1 - t) x + (t - s) delta) / (1 - s)
        return ((1 - s) * exact_flow_map(data, x, s, t) - (1 - t) * x) / (t - s)

    g = semigroup_weight(torch.tensor(s), torch.tensor(u), torch.tensor(t)).double()
    rhs = g * delta(x, s, u) + (1 - g) * delta(exact_flow_map(data, x, s, u), u, t)
    torch.testing.assert_close(delta(x, s, t), rhs, atol=2e-3, rtol=0)


# -----------------------------------------------------------------------------
# the network


def test_fresh_model_outputs_exactly_uniform_probabilities():
    model = tiny_model(V=50, perturb=False)
    h = torch.randn(2, 6, model.config.n_embd)
    d = denoiser(model, h, torch.rand(2))
    assert torch.equal(d, torch.full_like(d, 1 / 50))


def test_two_time_model_with_zeroed_second_embedder_equals_one_time_model():
    model = tiny_model()
    two = tiny_model()
    two.add_second_time()
    h, tau_s = torch.randn(3, 6, model.config.n_embd), torch.rand(3)
    torch.testing.assert_close(two(h, tau_s, torch.rand(3)), model(h, tau_s), atol=0, rtol=0)


# -----------------------------------------------------------------------------
# the projected state (METHOD.md 14)


@pytest.mark.parametrize("two_time", [False, True])
def test_projected_and_dense_samplers_return_identical_tokens(two_time):
    model = tiny_model(two_time=two_time)
    x0 = torch.randn(16, 8, 64, generator=torch.Generator().manual_seed(3))
    for steps in (1, 4, 16):
        dense = sample(DenseView(model), x0, steps)
        projected = sample(model, model.project(x0), steps)
        assert torch.equal(dense, projected)


@pytest.mark.parametrize("joint", [False, True])
def test_the_once_per_step_noise_factor_gives_the_per_micro_step_gradients(joint):
    from flow import carry_factor_grad

    model, teacher = (
        tiny_model(V=100),
        tiny_model(V=100, seed=1),
    )  # V > 2 D: the joint state has a factor too
    student = (
        joint_views(teacher, model)[1] if joint else model
    )  # the state a trained student E reads
    tokens = torch.randint(0, 100, (2, 4, 8), generator=torch.Generator().manual_seed(0))
    tau, keys = (
        torch.rand(2, 4, generator=torch.Generator().manual_seed(1)),
        slot_keys(0, 0, range(8)).view(2, 4),
    )
    loss = lambda m, factor=None: sum(
        flm_loss(m, tokens[i], tau[i], keys[i], factor=factor) / 2 for i in range(2)
    )
    loss(student).backward()  # the factor drawn inside every micro-step's loss
    per_micro = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    factor = state_factor(student)
    leaf = factor.detach().requires_grad_()  # as train_flm.py reads it
    loss(student, leaf).backward()
    carry_factor_grad(factor, leaf)
    assert leaf.grad.abs().max() > 1e-3  # the factor's gradient matters
    for a, b in zip(per_micro, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_the_noise_covariance_is_a_full_fp32_product_whatever_the_global_precision():
    from torch.utils._python_dispatch import TorchDispatchMode

    class Matmuls(
        TorchDispatchMode
    ):  # the precision asked for at every product that contracts over V
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if (
                func.__name__.startswith("mm")
                and args[0].shape[-1] == 300
                and args[0].shape[0] != 300
            ):
                backends = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
                seen.append((args[0].dtype, *(b.fp32_precision for b in backends)))
            return func(*args, **(kwargs or {}))

    seen, E = [], torch.randn(300, 16)
    backends = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    before = [b.fp32_precision for b in backends]
    for b, reduced in zip(backends, ("tf32", "bf16")):  # TF32 on CUDA, bf16 in the CPU's oneDNN
        b.fp32_precision = reduced
    try:
        with Matmuls():
            C = noise_factor(E)
            W = joint_noise_factor(torch.cat([E, E], 1))
        # fp32 products in full fp32; float64 ones (the joint factor's basis) are full precision anyway
        assert seen and all(s[0] == torch.float64 or s[1:] == ("ieee", "ieee") for s in seen), seen
        assert (
            torch.backends.mkldnn.matmul.fp32_precision == "bf16"
        )  # the global setting is restored
    finally:
        for b, value in zip(backends, before):
            b.fp32_precision = value
    gram = E.double().T @ E.double()
    torch.testing.assert_close((C.double() @ C.double().T), gram, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(
        W.double().T @ W.double(), torch.cat([gram, gram], 1).repeat(2, 1), rtol=1e-5, atol=1e-3
    )


def test_tf32_is_set_by_one_api_the_one_ieee_fp32_uses(tmp_path, monkeypatch):
    """trainer.Run turns TF32 on by fp32_precision, the API that ieee_fp32 and Inductor use: torch 2.13 refuses to
    read its flags once the legacy allow_tf32 was mixed in."""
    import signal
    from types import SimpleNamespace

    from trainer import Run

    legacy = []
    monkeypatch.setattr(torch._C, "_set_cublas_allow_tf32", lambda *a: legacy.append(("cublas", a)))
    monkeypatch.setattr(torch._C, "_set_cudnn_allow_tf32", lambda *a: legacy.append(("cudnn", a)))
    before = torch.backends.cuda.matmul.fp32_precision
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    args = SimpleNamespace(
        device="cpu", out_dir=str(tmp_path), dtype=None, batch_size=2, micro_batch=1
    )
    try:
        Run(SimpleNamespace(**vars(args), wandb=None), "check")
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        with ieee_fp32():
            assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.backends.cuda.matmul.fp32_precision == "tf32" and not legacy, legacy
    finally:
        torch.backends.cuda.matmul.fp32_precision = before
        for s, handler in handlers.items():
            signal.signal(s, handler)


def test_the_loss_is_the_cross_entropy_of_the_capped_logits_over_free_positions():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(3, 5, 7, dtype=torch.double, generator=g)
    ids, given = torch.randint(0, 7, (3, 5), generator=g), torch.rand(3, 5, generator=g) < 0.3
    soft = torch.softmax(torch.randn(3, 5, 7, dtype=torch.double, generator=g), -1)
    for target in (ids, soft):
        onehot = F.one_hot(target, 7).double() if target.dim() == 2 else target
        per_position = -(onehot * F.log_softmax(logits, -1)).sum(-1)  # METHOD.md 2 and 6
        free = (~given).double()
        expected = (
            (per_position * free).sum(1) / free.sum(1)
        ).mean()  # each row's free positions, then rows
        torch.testing.assert_close(
            cross_entropy(logits, target, given), expected, rtol=0, atol=1e-12
        )
        torch.testing.assert_close(
            cross_entropy(logits, target), per_position.mean(), rtol=0, atol=1e-12
        )
    model = tiny_model()
    model.config.logit_cap = 0.5  # the output cap c tanh(logits / c) of METHOD.md 9 binds at 0.5
    h, tau = draw_noise(model, slot_keys(0, 0, range(2)), 4), torch.rand(2)
    assert model(h, tau).abs().max() <= 0.5


def test_projected_noise_has_covariance_ete():
    model = tiny_model(V=64)
    E = model.embed.detach().double()
    n = 40_000
    h = draw_noise(model, slot_keys(4, 0, range(n)), 1)[:, 0].double().detach()  # (n, D)
    cov, target = h.T @ h / n, E.T @ E
    sd = torch.sqrt(
        (target.diag()[:, None] * target.diag()[None] + target**2) / n
    )  # sd of each entry
    assert ((cov - target).abs() <= 5 * sd).all()
    torch.testing.assert_close(noise_factor(E) @ noise_factor(E).T, target)


def test_projected_and_dense_losses_agree_in_expectation():
    model = tiny_model(V=64)
    g = torch.Generator().manual_seed(5)
    tokens, tau = torch.randint(64, (8, 8), generator=g), torch.rand(8, generator=g)
    with torch.no_grad():
        losses = {
            dense: torch.stack(
                [
                    flm_loss(
                        DenseView(model) if dense else model,
                        tokens,
                        tau,
                        slot_keys(5 + dense, i, range(8)),
                    )
                    for i in range(300)
                ]
            )
            for dense in (False, True)
        }
    diff = losses[False].mean() - losses[True].mean()
    stderr = torch.sqrt(losses[False].var() / 300 + losses[True].var() / 300)
    assert abs(diff) < 4 * stderr, (float(diff), float(stderr))
    assert (
        losses[False].std() > 0
    )  # the loss does depend on the noise, so the comparison means something


def test_a_hundred_steps_on_one_batch_drive_the_loss_down():
    model = tiny_model(V=64, perturb=False).train()
    g = torch.Generator().manual_seed(6)
    tokens = torch.randint(64, (16, 16), generator=g)
    tau = torch.linspace(0.05, 0.95, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(100):
        loss = flm_loss(model, tokens, tau, slot_keys(6, step, range(16)))  # fresh noise every step
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[0] == pytest.approx(math.log(64), abs=1e-4)
    assert (
        sum(losses[-10:]) / 10 < 0.6 * losses[0]
    )  # the mean of the last ten: one step's noise does not decide


# -----------------------------------------------------------------------------
# randomness by row and attention paths


def test_row_randomness_depends_on_the_row_key_alone_and_is_standard_normal():
    keys = slot_keys(0, 3, range(64))
    z = row_normal(keys, 20_000, 0).double()
    torch.testing.assert_close(row_normal(keys[10:12], 20_000, 0), z[10:12].float(), atol=0, rtol=0)
    assert not torch.equal(row_normal(keys, 100, 1), row_normal(keys, 100, 0))  # streams differ
    n = z.numel()
    assert abs(z.mean()) < 5 / math.sqrt(n) and abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs((z[:, 1:] * z[:, :-1]).mean()) < 5 / math.sqrt(n)  # neighbours uncorrelated
    assert abs((z[1:] * z[:-1]).mean()) < 5 / math.sqrt(n)  # rows uncorrelated
    u = row_uniform(keys, 20_000, 9).double()
    assert u.min() > 0 and u.max() < 1 and abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / n)


def uniform_of_2183f63(keys, n, raw_stream):
    """row_uniform as 2183f63 wrote it, in int64 throughout: the bits that keyed dropout must keep."""
    M = 0xFFFFFFFF
    mul32 = lambda x, c: (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & M

    def h(x):
        x = mul32(x ^ (x >> 16), 0x7FEB352D)
        x = mul32(x ^ (x >> 15), 0x846CA68B)
        return x ^ (x >> 16)

    row = h(h((keys & M) ^ h(torch.tensor(raw_stream & M))) ^ ((keys >> 32) & M))
    bits = h(h(torch.arange(n))[None] ^ row[:, None])
    return ((bits >> 8).float() + 0.5) * 2.0**-24


@pytest.mark.parametrize("p", [0.1, 0.25, 0.5, 0.75, 1e-3, 0.4999999, 0.5000001])
def test_keyed_dropout_keeps_the_masks_of_2183f63_bit_for_bit(p):
    import rng

    keys = torch.cat([slot_keys(1337, 3, range(5)), torch.tensor([0, 2**63 - 1])])
    x = torch.randn(7, 16, 24, generator=torch.Generator().manual_seed(0))
    for raw in (rng.stream("dropout", 0), rng.stream("dropout", 7), rng.stream("noise", 3)):
        old = uniform_of_2183f63(keys, 16 * 24, raw).view_as(x)
        assert torch.equal(rng.row_uniform(keys, 16 * 24, raw).view_as(x), old)
        assert torch.equal(rng.dropout(x, p, keys, raw), x.mul(old >= p).div_(1 - p)), (p, raw)
    u = (torch.arange(1 << 24).float() + 0.5) * 2.0**-24  # every 24-bit uniform, in float32
    assert rng._keep_threshold(p) == int((u < p).sum())  # the first kept k


def test_dropout_of_a_row_does_not_depend_on_the_batch_it_is_in():
    model = tiny_model(V=64)
    model.config.dropout = 0.5
    model.train()
    h, tau, keys = torch.randn(6, 8, model.config.n_embd), torch.rand(6), slot_keys(0, 0, range(6))
    full = model(h, tau, keys=keys)
    torch.testing.assert_close(
        model(h[2:5], tau[2:5], keys=keys[2:5]), full[2:5], atol=1e-5, rtol=1e-5
    )
    assert not torch.allclose(
        model(h, tau, keys=slot_keys(1, 0, range(6))), full
    )  # other keys, other masks
    model.eval()
    assert not torch.allclose(model(h, tau, keys=keys), full)  # dropout was on in training


def test_dropout_masks_of_different_sites_and_layers_are_uncorrelated(monkeypatch):
    import model as model_module

    model = tiny_model(V=64)
    model.config.dropout = 0.5
    model.train()
    masks, dropout = [], model_module.dropout

    def recording(x, p, keys, stream):
        out = dropout(x, p, keys, stream)
        masks.append((out != 0).double().flatten())
        return out

    monkeypatch.setattr(model_module, "dropout", recording)
    model(torch.randn(16, 8, model.config.n_embd), torch.rand(16), keys=slot_keys(0, 0, range(16)))
    assert len(masks) == 2 * model.config.n_layer  # attention and MLP branches of every block
    corr = torch.corrcoef(torch.stack(masks))
    off = corr[~torch.eye(len(masks), dtype=torch.bool)]
    assert off.abs().max() < 0.05, corr  # 4,096 entries each: |corr| ~ 0.016 by chance
    assert all(abs(m.mean() - 0.5) < 0.05 for m in masks)


def test_the_network_is_fed_the_rows_tau_in_the_flm_loss():
    model = tiny_model()
    tau = torch.tensor([0.05, 0.3, 0.6, 0.95])
    seen = []
    model.t_embedder.register_forward_hook(lambda module, args, out: seen.append(args[0]))
    tokens = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(0))
    flm_loss(model, tokens, tau, slot_keys(0, 0, range(4)))
    assert len(seen) == 1 and torch.equal(seen[0], tau)  # tau itself, not the physical time t(tau)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_the_stochastic_sampler_keeps_the_marginals_of_the_flow(gamma):
    # with a model whose flow map is exactly one sequence (delta = its one-hot whatever the input), the state before
    # each step must be x_t = (1 - t) x_0 + t x_1 in distribution: mean t E[x_1], variance (1 - t)^2 diag(E^T E)
    model, target = (
        tiny_model(two_time=True, perturb=False),
        7,
    )  # a fresh model: its output layer is zero
    with torch.no_grad():
        model.final_layer.linear.bias[target] = (
            40.0  # delta = one_hot(7) at every position, to 1e-16
        )
    B, L = 4000, 6
    keys = slot_keys(0, 0, range(B))
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    steps = 4
    sample(model, draw_noise(model, keys, L), steps, gamma=gamma, keys=keys)
    E, warp = model.embed.detach(), time_warp(model)
    ts = warp.t(torch.linspace(0, 1, steps + 1))
    for h, t in zip(seen, ts[:-1]):
        mean, var = h.mean(0), h.var(0)  # (L, D)
        std_err = (1 - t) * (E**2).sum(0).sqrt() / math.sqrt(B)
        assert ((mean - t * E[target]).abs() < 5 * std_err + 1e-5).all(), (gamma, float(t))
        torch.testing.assert_close(
            var, ((1 - t) ** 2 * (E**2).sum(0)).expand_as(var), rtol=0.15, atol=1e-6
        )


def test_flex_attention_with_softcap_score_mod_equals_the_explicit_formula():
    g = torch.Generator().manual_seed(7)
    q, k, v = (
        torch.randn(2, 16, 4, 8, generator=g) * 6 for _ in range(3)
    )  # logits large enough to be capped
    explicit = attention(q, k, v, softcap=5.0, backend="explicit")
    torch.testing.assert_close(
        attention(q, k, v, softcap=5.0, backend="flex"), explicit, atol=1e-5, rtol=1e-5
    )
    assert not torch.allclose(
        attention(q, k, v, softcap=500.0, backend="explicit"), explicit, atol=1e-3
    )


# -----------------------------------------------------------------------------
# conditioning, autoguidance, the joint state


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("two_time", [False, True])
def test_given_positions_come_back_unchanged_from_every_sampler_at_every_step_count(
    two_time, dense
):
    model, weak = tiny_model(two_time=two_time), tiny_model(seed=1, two_time=two_time)
    if dense:
        model, weak = DenseView(model), DenseView(weak)
    B, L, keys = 6, 10, slot_keys(0, 0, range(6))
    given = given_mask(keys, L, 1.0)
    tokens = torch.randint(0, 64, (B, L), generator=torch.Generator().manual_seed(0))
    x = draw_noise(model, keys, L)
    variants = [dict(), dict(guide=(weak, 1.5))] + ([dict(gamma=0.5)] if two_time else [])
    for steps in (1, 2, 3, 8):
        for kw in variants:
            out = sample(model, x, steps, (given, tokens), keys=keys, **kw)
            assert torch.equal(out[given], tokens[given]), (steps, kw)
            free = sample(model, x, steps, keys=keys, **kw)
            assert not torch.equal(out, free)  # the given tokens reach the free positions


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("two_time", [False, True])
def test_every_sampler_step_feeds_the_network_the_clean_given_tokens(two_time, dense):
    # the free positions read the prompt at every step, not only at the first (the output's overwrite hides that)
    net, weak = tiny_model(two_time=two_time), tiny_model(seed=1, two_time=two_time)
    model, weak = (DenseView(net), DenseView(weak)) if dense else (net, weak)
    B, L, keys = 6, 10, slot_keys(0, 0, range(6))
    given = given_mask(keys, L, 1.0)
    tokens = torch.randint(0, 64, (B, L), generator=torch.Generator().manual_seed(0))
    x = draw_noise(model, keys, L)
    seen = []
    hook = net.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    for kw in [dict(), dict(guide=(weak, 1.5))] + ([dict(gamma=0.5)] if two_time else []):
        seen.clear()
        sample(model, x, 4, (given, tokens), keys=keys, **kw)
        assert len(seen) == 4
        for h in seen:  # (B, L, D): the network's input at each step
            torch.testing.assert_close(h[given], net.embed[tokens][given], atol=1e-5, rtol=0)
    hook.remove()


@pytest.mark.parametrize("dense", [False, True])
def test_the_sampler_state_stays_fp32_under_bf16_autocast(dense):
    net, weak = tiny_model(V=100, two_time=True), tiny_model(V=100, seed=1, two_time=True)
    model, weak = (DenseView(net), DenseView(weak)) if dense else (net, weak)
    keys = slot_keys(0, 0, range(4))
    seen = []
    net.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = draw_noise(model, keys, 8)
        assert x.dtype == torch.float32
        for kw in (dict(), dict(gamma=0.5), dict(guide=(weak, 2.0))):
            sample(model, x, 3, keys=keys, **kw)
    assert len(seen) == 9 and set(seen) == {
        torch.float32
    }  # the network's input at every step of every sampler


def test_given_masks_are_prefixes_or_spans_keyed_by_row_and_never_all_given():
    keys, L = slot_keys(0, 0, range(4000)), 16
    given = given_mask(keys, L, 0.5)
    cond = given.any(1)
    assert abs(cond.double().mean().item() - 0.5) < 0.05  # the share of conditional rows
    assert not given.all(1).any()
    prefix = torch.tensor([torch.equal(g, torch.arange(L) < g.sum()) for g in given])
    assert (
        0.2 < (prefix & cond).double().mean() < 0.35
    )  # about half the conditional rows are prompts
    assert torch.equal(given_mask(keys[7:9], L, 0.5), given[7:9])  # a row's mask is its key's alone
    assert not given_mask(keys, L, 0.0).any()


def test_conditional_loss_leaves_given_positions_out_and_feeds_them_clean():
    model = tiny_model()
    B, L, keys = 4, 8, slot_keys(0, 0, range(4))
    tokens = torch.randint(0, 64, (B, L), generator=torch.Generator().manual_seed(1))
    given = torch.zeros(B, L, dtype=torch.bool)
    given[:, :3] = True
    h = noisy_input(model, tokens, torch.full((B,), 0.3), keys, given=given)
    torch.testing.assert_close(h[:, :3], model.embed[tokens[:, :3]], atol=0, rtol=0)
    # changing a given token changes the loss only through the free positions' view of it
    other = tokens.clone()
    other[:, 4:] = (other[:, 4:] + 1) % 64  # free tokens differ: loss differs
    tau = torch.full((B,), 0.5)
    assert flm_loss(model, tokens, tau, keys, given=given) != flm_loss(
        model, other, tau, keys, given=given
    )
    # all free: the conditional mean equals the plain mean
    none = torch.zeros(B, L, dtype=torch.bool)
    torch.testing.assert_close(
        flm_loss(model, tokens, tau, keys, given=none), flm_loss(model, tokens, tau, keys)
    )


@pytest.mark.parametrize("dense", [False, True])
def test_autoguidance_eta_one_is_the_model_and_eta_zero_the_weak_model_exactly(dense):
    model = tiny_model(two_time=False)
    weak = tiny_model(seed=1)
    if dense:
        model, weak = DenseView(model), DenseView(weak)
    else:  # the projected state needs one E for both, else they read a joint state (next test)
        weak.embed.data.copy_(model.embed.data)
    keys = slot_keys(0, 0, range(8))
    x = draw_noise(model, keys, 12)
    for steps in (1, 4):
        plain, weak_only = (sample(m, x, steps, keys=keys) for m in (model, weak))
        assert not torch.equal(plain, weak_only)
        assert torch.equal(sample(model, x, steps, guide=(weak, 1.0), keys=keys), plain)
        assert torch.equal(sample(model, x, steps, guide=(weak, 0.0), keys=keys), weak_only)


def test_joint_noise_factor_has_the_joint_covariance_even_for_dependent_columns():
    # to float rounding: 1e-12 of E^T E's scale in float64, 1e-5 in float32 (a QR is backward stable)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        E = torch.randn(40, 6, generator=torch.Generator().manual_seed(0), dtype=dtype)
        other = E + 0.1 * torch.randn(
            40, 6, generator=torch.Generator().manual_seed(1), dtype=dtype
        )
        for joint in (
            torch.cat([E, E], 1),
            torch.cat([E, other], 1),
            torch.cat([E, 2 * E[:, :3]], 1),
        ):
            W = joint_noise_factor(joint)
            gram = joint.double().T @ joint.double()
            scale = gram.abs().max().item()
            torch.testing.assert_close(W.double().T @ W.double(), gram, atol=tol * scale, rtol=0)
    a, b = joint_views(tiny_model(), tiny_model())
    b.net.embed.data.copy_(a.net.embed.data)
    a, b = joint_views(a.net, b.net)
    h = draw_noise(a, slot_keys(0, 0, range(3)), 5)
    torch.testing.assert_close(
        h[..., :32], h[..., 32:], atol=1e-5, rtol=0
    )  # equal E: the two halves agree


def test_joint_noise_gradient_in_e_is_unbiased():
    """E[d/dE f(x_0 @ E)] by the joint factor (its basis held fixed) equals the pathwise gradient of the dense
    draw, for dependent columns too: Monte Carlo over 1,000,000 draws."""
    g = torch.Generator().manual_seed(0)
    V, D, n = 12, 3, 1_000_000
    E0 = torch.randn(V, D, generator=g, dtype=torch.float64)
    c = torch.randn(2 * D, generator=g, dtype=torch.float64)
    f = lambda h: (torch.sin(h) @ c).mean()  # noqa: E731
    grads = []
    for dense in (True, False):
        Es = E0.clone().requires_grad_(True)
        joint = torch.cat([E0, Es + 0.3 * E0.flip(0)], 1)  # the second block depends on the first
        z = torch.randn(n, V if dense else 2 * D, generator=g, dtype=torch.float64)
        f(z @ joint if dense else z @ joint_noise_factor(joint)).backward()
        grads.append(Es.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=0.02, rtol=0)


# -----------------------------------------------------------------------------
# reward guidance (METHOD.md 16)


def linear_reward(V, seed=0):
    """r(p) = sum_l p_l . w, with a known gradient; w favours a few tokens."""
    w = torch.randn(V, generator=torch.Generator().manual_seed(seed))
    return (lambda p: (p * w.to(p.dtype)).sum((-1, -2))), w


@pytest.mark.parametrize("two_time, steps", [(True, 1), (True, 3), (False, 4)])
@pytest.mark.parametrize("form", ["endpoint", "lookahead"])
def test_reward_scale_zero_gives_the_unguided_samples_bitwise(two_time, steps, form):
    from flow import RewardGuide, generate

    model = tiny_model(two_time=two_time)
    reward, _ = linear_reward(64)
    plain = generate(model, 6, 8, steps, batch_size=3)
    assert torch.equal(
        generate(model, 6, 8, steps, batch_size=3, reward=RewardGuide(reward, 0.0, form)), plain
    )
    assert not torch.equal(
        generate(model, 6, 8, steps, batch_size=3, reward=RewardGuide(reward, 50.0, form)), plain
    )


@pytest.mark.parametrize(
    "form, scales", [("endpoint", (0.0, 0.5, 2.0, 8.0)), ("lookahead", (0.0, 0.05, 0.2, 0.8))]
)
def test_one_step_reward_rises_with_the_scale(form, scales):
    from flow import RewardGuide, generate

    model = tiny_model(two_time=True)
    reward, w = linear_reward(64)
    means = []
    for scale in scales:
        tokens = generate(model, 64, 8, 1, reward=RewardGuide(reward, scale, form))
        means.append(w[tokens].sum(1).mean().item())  # the reward of the hard samples
    assert all(a < b for a, b in zip(means, means[1:])), means


@pytest.mark.parametrize("two_time", [True, False])
def test_the_lookahead_gradient_is_the_finite_difference_of_the_reward_of_the_look_ahead(two_time):
    from flow import lookahead_grad

    model = tiny_model(two_time=two_time)
    reward, _ = linear_reward(64)
    reward2 = lambda p: reward(p) + (p[..., :5] ** 2).sum((-1, -2))  # not linear in p either
    g = torch.Generator().manual_seed(0)
    x, tau_s = torch.randn(2, 6, 64, generator=g), torch.tensor([0.2, 0.6])
    E = model.embed.detach()
    grad_x = (
        lookahead_grad(model, x @ E, tau_s, reward2) @ E.T
    )  # the projected state's gradient, in x: g_h E^T
    tau_1 = torch.ones_like(tau_s) if two_time else None
    r = lambda z: reward2(denoiser(model, z @ E, tau_s, tau_1)).sum()
    for _ in range(5):  # fp32: a central difference of step 1e-2 along a unit direction
        v = torch.randn(x.shape, generator=g)
        v /= v.norm()
        fd = (r(x + 1e-2 * v) - r(x - 1e-2 * v)) / 2e-2
        assert abs(fd - (grad_x * v).sum()) < 2e-3 * grad_x.norm(), (
            fd,
            (grad_x * v).sum(),
            grad_x.norm(),
        )


@pytest.mark.parametrize("form", ["endpoint", "lookahead"])
def test_projected_and_dense_guidance_agree(form):
    from flow import RewardGuide

    model = tiny_model(V=80, two_time=True)  # V > D: the projected state is smaller than x
    reward, _ = linear_reward(80)
    x0 = torch.randn(16, 8, 80, generator=torch.Generator().manual_seed(3))
    guide = RewardGuide(reward, 8.0 if form == "endpoint" else 1.0, form, iters=2)
    dense = sample(DenseView(model), x0, 2, reward=guide)
    assert torch.equal(sample(model, model.project(x0), 2, reward=guide), dense)
    assert not torch.equal(sample(model, model.project(x0), 2), dense)


@pytest.mark.parametrize("form", ["endpoint", "lookahead"])
def test_given_positions_come_back_unchanged_under_guidance(form):
    from flow import RewardGuide, generate

    model = tiny_model(two_time=True)
    reward, w = linear_reward(64)
    tokens = torch.full(
        (8,), int(w.argmin())
    )  # the token the reward likes least, given at every other position
    given = torch.arange(8) % 2 == 0
    out = generate(model, 6, 8, 2, cond=(given, tokens), reward=RewardGuide(reward, 10.0, form))
    assert (out[:, given] == tokens[given]).all()
    assert (out[:, ~given] != int(w.argmin())).any()


# -----------------------------------------------------------------------------
# the final decode: temperature and nucleus


@pytest.mark.parametrize("two_time, steps", [(True, 1), (False, 4)])
def test_temperature_zero_and_the_smallest_nucleus_give_the_argmax_samples_bitwise(two_time, steps):
    from flow import generate

    model = tiny_model(two_time=two_time)
    plain = generate(model, 8, 8, steps, batch_size=4)
    assert torch.equal(generate(model, 8, 8, steps, batch_size=4, temperature=0.0), plain)
    assert torch.equal(
        generate(model, 8, 8, steps, batch_size=4, temperature=1.0, top_p=1e-9), plain
    )
    hot = generate(model, 8, 8, steps, batch_size=4, temperature=1.5)
    assert not torch.equal(hot, plain)
    assert torch.equal(
        generate(model, 8, 8, steps, batch_size=3, temperature=1.5), hot
    )  # keyed by row


def test_the_keyed_draw_follows_the_tempered_nucleus():
    from flow import final_tokens

    d = torch.tensor([0.5, 0.3, 0.15, 0.05]).expand(
        1, 20_000, 4
    )  # one row, many positions, one distribution
    keys = slot_keys(0, 0, range(1))
    for T, top_p, want in (
        (1.0, 1.0, [0.5, 0.3, 0.15, 0.05]),
        (1.0, 0.75, [0.5 / 0.8, 0.3 / 0.8, 0, 0]),
        (0.5, 1.0, [v**2 / 0.365 for v in (0.5, 0.3, 0.15, 0.05)]),
    ):
        freq = torch.bincount(final_tokens(d, T, top_p, keys)[0], minlength=4).double() / 20_000
        assert torch.allclose(freq, torch.tensor(want, dtype=torch.double), atol=0.012), (
            T,
            top_p,
            freq,
        )


def test_every_random_stream_has_a_range_of_its_own_and_no_two_uses_draw_the_same_uniforms(
    monkeypatch,
):
    import rng

    ranges = sorted(rng.STREAMS.values())
    assert (
        all(a + n <= b for (a, n), (b, _) in zip(ranges, ranges[1:]))
        and ranges[-1][0] + ranges[-1][1] <= 2**32
    )
    with pytest.raises(ValueError, match="noise"):
        rng.stream("noise", rng.STREAMS["noise"][1])
    # record which function draws each raw stream over every use: noise, dropout, masks, the stochastic sampler,
    # a categorical decode and the factorized control
    users, row = {}, rng._row  # every draw of a stream starts from its rows' hash, rng._row

    def recording(keys, raw_stream):
        caller = next(f.function for f in inspect.stack()[1:] if f.filename != rng.__file__)
        users.setdefault(raw_stream, set()).add(caller)
        return row(keys, raw_stream)

    monkeypatch.setattr(rng, "_row", recording)
    model = tiny_model(V=100)
    model.config.dropout = 0.1
    keys = slot_keys(0, 0, range(4))
    tokens = torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(0))
    flm_loss(model.train(), tokens, torch.rand(4), keys, given_mask(keys, 8, 0.5))
    model = tiny_model(V=100, two_time=True)
    generate(model, 4, 8, 3, gamma=0.5, temperature=0.8)
    factorized_sample(model, 4, 8)
    shared = {s: u for s, u in users.items() if len(u) > 1}
    assert not shared, shared
    assert {"draw_noise", "forward", "given_mask", "final_tokens"} <= set().union(*users.values())


def test_final_tokens_draws_on_the_device_of_the_denoiser():
    from flow import final_tokens

    d = torch.rand(2, 8, 50).softmax(-1).to("meta")  # a second device on a CPU machine (as CUDA is)
    keys = slot_keys(0, 0, range(2))  # on the CPU, as generate makes them
    assert final_tokens(d, 0.8, 0.95, keys).device.type == "meta"


def test_attention_runs_in_fp32_when_the_model_does():
    import model as model_module

    for flash in (None, lambda *a, **k: None):  # without flash-attn, and with it installed
        model_module.flash_attn_func, saved = flash, model_module.flash_attn_func
        try:
            fp32 = model_module.attention_backend("cuda", torch.float32)
            bf16 = model_module.attention_backend("cuda", torch.bfloat16)
        finally:
            model_module.flash_attn_func = saved
        assert fp32 == "flex" and bf16 == ("flash" if flash else "flex")
    assert model_module.attention_backend("cpu", torch.float32) == "explicit"
