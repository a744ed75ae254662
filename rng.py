"""
Randomness by row: every random number of a step (a window, noise, dropout, a conditioning mask, a sampled token)
is a function of (row key, stream, index), and a row's key one of (seed, step, slot in the global batch). A run
therefore draws the same numbers at any number of ranks and micro-steps, on the CPU and CUDA, in plain integer
tensor arithmetic that torch.compile fuses.

The streams are named in one table, STREAMS, each a range of raw stream numbers of its own, so that no two uses
ever draw the same uniforms (test_simplex.py checks that the ranges are disjoint and that every use stays in its
own). A pass that needs dropout masks of its own (the two passes of the semigroup target, the forward-mode pass of
the Lagrangian and Eulerian targets) runs with its rows' keys plus its offset in PASS_KEYS.
"""

import functools
import math

import torch
import torch.nn.functional as F

_M32, _M64 = 0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF

# name -> (first raw stream, how many): the raw stream numbers each use draws from
STREAMS = {
    # Box-Muller normals: noise j takes raw streams 2j and 2j + 1; j = 0 is x_0, j = 1 + i the stochastic
    # sampler's fresh noise at step i (flow.draw_noise)
    "noise": (0, 1 << 23),
    "given": (1 << 23, 1),  # the conditioning masks (flow.given_mask)
    # dropout of block l: 2l on the attention branch, 2l + 1 on the MLP's
    "dropout": (1 << 24, 1 << 23),
    # the final draw of tokens (flow.final_tokens): two 24-bit halves of a 48-bit uniform
    "final": (3 << 23, 2),
}


# the passes of a distillation loss that draw dropout masks, each with its rows' keys + its offset here: other
# rows' keys, which the 63-bit hash makes independent of every real row's. One loss's passes take different
# offsets (test_distill): the semigroup's (student, s to u, u to t), the Lagrangian's and Eulerian's (student,
# forward mode, and self-distillation's own teacher); passes that never share a loss may share an offset.
PASS_KEYS = {"student": 0, "s to u": 1, "u to t": 2, "forward mode": 1, "own teacher": 2}


def stream(name, i=0):
    """The raw stream number of entry i of the named stream; an index outside its range is an error."""
    first, count = STREAMS[name]
    if not 0 <= i < count:
        raise ValueError(f"stream {name!r} has entries 0..{count - 1}, not {i}")
    return first + i


def _mul32(x, c):
    """x * c mod 2^32 for x in [0, 2^32), with c split in 16-bit halves so that int64 never overflows."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _hash32(x):
    """lowbias32 (C. Wellons), a bijective 32-bit mix of an int64 tensor of values in [0, 2^32)."""
    x = _mul32(x ^ (x >> 16), 0x7FEB352D)
    x = _mul32(x ^ (x >> 15), 0x846CA68B)
    return x ^ (x >> 16)


def _splitmix64(z):
    z = (z + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def row_key(seed, step, slot):
    """The 63-bit key of one row of the global batch (step -1: evaluation)."""
    return _splitmix64(_splitmix64(_splitmix64(seed & _M64) ^ (step & _M64)) ^ (slot & _M64)) >> 1


def slot_keys(seed, step, slots):
    """int64 keys (n,) of the global-batch slots at a step, on the host (a step copies them once, to_device)."""
    return torch.tensor([row_key(seed, step, int(s)) for s in slots], dtype=torch.int64)


def step_generator(seed, step):
    """A CPU generator for the draws that a step shares across its whole batch (times, permutations)."""
    return torch.Generator().manual_seed(row_key(seed, step, -1))


def _row(keys, raw_stream):
    """The 32-bit hash (B,) of each row's key and a raw stream, from which all of a row's draws in that stream
    come (row_uniform, dropout)."""
    salt = _hash32(raw_stream & _M32)  # a Python int: no tensor made from host data on the device
    return _hash32(_hash32((keys & _M32) ^ salt) ^ ((keys >> 32) & _M32))


def row_uniform(keys, n, raw_stream):
    """U(0, 1) float32 (B, n), 24-bit resolution: entry (b, i) is a function of (keys[b], raw_stream, i) alone."""
    row = _row(keys, raw_stream)  # (B,)
    bits = _hash32(_hash32(torch.arange(n, device=keys.device))[None] ^ row[:, None])  # (B, n)
    return ((bits >> 8).float() + 0.5) * 2.0**-24


def row_normal(keys, n, j=0):
    """N(0, 1) float32 (B, n): noise j, by Box-Muller from its two uniform streams (tails cut at 5.9 sigma by the
    resolution)."""
    u1 = row_uniform(keys, n, stream("noise", 2 * j))
    u2 = row_uniform(keys, n, stream("noise", 2 * j + 1))
    return torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)


def _as_int32(x):
    """int64 values in [0, 2^32) as the int32 of the same 32 bits."""
    return (x - ((x >> 31) << 32)).to(torch.int32)


def _keep_threshold(p):
    """The least 24-bit k whose uniform ((k + 0.5) * 2^-24, in float32 as row_uniform rounds it) is >= p in
    float32, so that u >= p exactly when k >= it; plain Python arithmetic, which torch.compile folds."""
    m, e = math.frexp(p)
    P = math.ldexp(round(math.ldexp(m, 24)), e)  # p in float32 (round half to even), times 2^24
    k = max(0, math.ceil(P - 0.5))  # below 2^23, k + 0.5 is exact
    if k < 1 << 23:
        return k
    c = math.ceil(P)  # from 2^23 on, k + 0.5 rounds to the even one of k, k + 1
    return max(1 << 23, c - 1 if c % 2 == 0 else c)


@functools.cache
def _column_bits(n, device):
    """_hash32(i) for i < n as int32, the part of dropout's hash that no row changes: made once per size."""
    return _as_int32(_hash32(torch.arange(n, device=device)))


def dropout(x, p, keys, raw_stream):
    """Inverted dropout of x (B, ...) whose mask is row_uniform(keys, n, raw_stream) >= p, bit for bit; torch's
    generator when no keys are given. The mask is computed in 32-bit integers, in place in two buffers: 13 passes
    of 4 bytes and one of 1 per element (53 bytes), against 190 in int64 through row_uniform. int32 products
    wrap modulo 2^32 on the CPU and in CUDA, as the hash's products must; test_simplex compares the masks with
    row_uniform's."""
    if p == 0:
        return x
    if keys is None:
        return F.dropout(x, p)
    row = _as_int32(_row(keys, raw_stream))  # (B,), as row_uniform's
    y = (
        _column_bits(x[0].numel(), keys.device)[None] ^ row[:, None]
    )  # (B, n): the bits before the last hash
    t = torch.empty_like(y)
    for shift, c in (
        (16, 0x7FEB352D),
        (15, 0x846CA68B - (1 << 32)),
        (16, None),
    ):  # _hash32, in int32
        torch.bitwise_right_shift(y, shift, out=t)
        y.bitwise_xor_(t.bitwise_and_((1 << (32 - shift)) - 1))
        y = (
            y.mul_(c) if c else y.bitwise_xor_(-(1 << 31))
        )  # last: the sign flipped, for unsigned order
    keep = y >= (_keep_threshold(p) << 8) - (1 << 31)  # (bits >> 8) >= k, as uint32 bits >= k << 8
    return x.mul(keep.view_as(x)).div_(1 - p)
