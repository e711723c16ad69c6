"""What quantization cost: weight error per tensor role, and perplexity against fp32.

``role_table`` turns the writer's per-tensor error sums into one row per role (relative
RMS error ||W_q - W|| / ||W|| over the role's tensors, and the worst single tensor);
``format_report`` prints it with the perplexities when an evaluation text was given.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .schemes import ROLES, role_of


@dataclass(frozen=True)
class RoleError:
    role: str
    schemes: tuple[str, ...]  # the schemes the role's tensors were stored in
    tensors: int
    rel_rms: float  # sqrt(sum of squared errors / sum of squared weights) over the role
    worst_tensor: str
    worst_rel_rms: float

    def to_dict(self) -> dict:
        return asdict(self)


def role_table(errors: dict[str, tuple[float, float]], tensor_schemes: dict[str, str]) -> list[RoleError]:
    """errors: tensor -> (sum sq error, sum sq weight); tensor_schemes: tensor -> scheme name."""
    rows = []
    for role in ROLES:
        names = [n for n in errors if role_of(n) == role]
        if not names:
            continue
        err = sum(errors[n][0] for n in names)
        ref = sum(errors[n][1] for n in names)
        rel = {n: math.sqrt(errors[n][0] / errors[n][1]) if errors[n][1] > 0 else 0.0 for n in names}
        worst = max(names, key=rel.__getitem__)
        rows.append(RoleError(role, tuple(sorted({tensor_schemes[n] for n in names})), len(names),
                              math.sqrt(err / ref) if ref > 0 else 0.0, worst, rel[worst]))
    return rows


def format_report(rows: list[RoleError], perplexity: dict | None = None, grid: dict | None = None) -> str:
    lines = ["quantization error by tensor role (relative RMS ||Wq - W|| / ||W||):",
             f"  {'role':<10} {'scheme':<14} {'tensors':>7} {'rel RMS':>9}  worst tensor"]
    for r in rows:
        lines.append(f"  {r.role:<10} {','.join(r.schemes):<14} {r.tensors:>7} {r.rel_rms:>9.4%}  "
                     f"{r.worst_tensor} {r.worst_rel_rms:.4%}")
    if grid:
        lines += format_grid(grid)
    if perplexity:
        lines.append(f"on {perplexity['text']}:")
        lines += ["  " + line for line in format_comparison(perplexity["comparison"]).splitlines()]
    return "\n".join(lines)


def format_comparison(c: dict) -> str:
    """``Model.compare``'s result as llama.cpp's --kl-divergence prints it, in a few lines."""
    return "\n".join([
        f"{c['predicted']} predicted tokens (BOS + text):",
        f"  {c['base_quant']:<11} perplexity {c['base_perplexity']:.4f}  (base: {c['base']})",
        f"  {c['quant']:<11} perplexity {c['perplexity']:.4f}  {c['perplexity_ratio'] - 1:+.2%} vs base",
        f"  KL divergence from base: mean {c['kl_mean']:.5f}, 99th percentile {c['kl_p99']:.5f}, max {c['kl_max']:.4f}",
        f"  same most likely token as base: {c['top1_agreement']:.2%}",
    ])


def format_grid(grid: dict) -> list[str]:
    """Which int4 blocks were kept on the 4-bit grid the source already had (Q4_0, QAT)."""
    exact = sorted(n for n, g in grid.items() if g.get("blocks") and g.get("imported", 0) == g["blocks"])
    partly = sorted(n for n, g in grid.items() if 0 < g.get("imported", 0) < g.get("blocks", 0))
    blocks = sum(g.get("blocks", 0) for g in grid.values())
    imported = sum(g.get("imported", 0) for g in grid.values())
    clipped = sum(g.get("clipped", 0) for g in grid.values())
    if not imported:
        return [f"4-bit grid: none of the {blocks} int4 blocks of 32 lay on a 4-bit grid already (rounded anew)"]
    out = [f"4-bit grid: {imported} of {blocks} int4 blocks of 32 kept the source's own values and scale "
           f"(Q4_0 / QAT); in {clipped} of them the values at +8 steps moved to +7 (LiteRT takes no negative scales)",
           f"  imported exactly: {len(exact)} tensors" + (f" ({', '.join(exact[:6])}{', ...' if len(exact) > 6 else ''})"
                                                          if exact else "")]
    if partly:
        shown = [f"{n} {grid[n]['imported']}/{grid[n]['blocks']}" for n in partly[:6]]
        out.append("  partly: " + ", ".join(shown) + (", ..." if len(partly) > 6 else ""))
    return out
