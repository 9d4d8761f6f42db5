"""Counter-based random streams, one per row: the uniform of row i at step t is a pure function
of (key_i, t), so a row draws the same numbers alone, in any batch, in any order, on any rank.

A key is two 32-bit lanes hashed from integers (`stream_keys`); a uniform is MurmurHash3's
32-bit finaliser over the lanes and the counter (`stream_uniforms`). The arithmetic runs on
int64 tensors holding 32-bit words, multiplications split so no product overflows, so CPU and
CUDA give the same bits.
"""

from __future__ import annotations

import torch

M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x·c mod 2³² for int64 x < 2³², c split in 16-bit halves so no product passes 2⁴⁹."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & M32


def _fmix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's finaliser: a bijection of 32-bit words in which every bit flips about half
    of the output bits (shifts of non-negative int64 are logical)."""
    x = _mul32(x ^ (x >> 16), 0x85EBCA6B)
    x = _mul32(x ^ (x >> 13), 0xC2B2AE35)
    return x ^ (x >> 16)


def stream_keys(*parts: int | torch.Tensor) -> torch.Tensor:
    """(B, 2) int64 keys of per-row random streams (two 32-bit lanes) hashed from integer parts,
    e.g. (seed, step, the prompt's position in the global batch, the sample's index); a (B,)
    tensor part gives each row its own value. Equal parts give equal streams."""
    lanes = [torch.tensor(0x243F6A88), torch.tensor(0x85A308D3)]
    for part in parts:
        w = torch.as_tensor(part, dtype=torch.long)
        for half in (w & M32, (w >> 32) & M32):
            a, b = lanes
            lanes = [_fmix32(a ^ _fmix32(half)), _fmix32(b ^ _mul32(half, 0x9E3779B1))]
    return torch.stack(torch.broadcast_tensors(*lanes), dim=-1).reshape(-1, 2)


def stream_uniforms(keys: torch.Tensor, t: int) -> torch.Tensor:
    """(B,) float32 uniforms in [0, 1) of the rows' streams at counter t: a pure function of
    (key, t), 24 bits of fmix32(a ⊕ fmix32(b ⊕ (t + 1)·φ)) for the key's lanes (a, b)."""
    g = _mul32(torch.full_like(keys[:, 1], t + 1), 0x9E3779B9)
    h = _fmix32(keys[:, 0] ^ _fmix32(keys[:, 1] ^ g))
    return (h >> 8).float() * 2.0**-24
