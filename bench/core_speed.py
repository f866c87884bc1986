"""Speed of the influence core on all-MiniLM-L6-v2 (scope = last encoder layer + pooler +
classifier).

Measures: per-example loss gradients (vmap vs loop, ratio), one GGN-vector product and one
Hessian-vector product at the LiSSA batch size, ∇θ w (double backprop), one LiSSA solve and one
low-rank solve (ratio LiSSA / low-rank; the low-rank fit is reported separately, it is paid once
per bundle), Eq. 8 exact vs first-order for one training example.
With --bundle DIR the prepared bundle is used, else the raw packaged MiniLM with a fitted head.
Last line: one JSON object with every figure (seconds unless named otherwise).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fidelity import lissa_progress, load_minilm_problem, log, salient_word_positions

from pairdots_server.core.batches import Batch, TensorBatches
from pairdots_server.core.curvature import (
    Curvature,
    CurvatureOperator,
    estimate_lambda_max,
)
from pairdots_server.core.grads import (
    per_example_loss_grads,
    per_example_loss_grads_loop,
)
from pairdots_server.core.ihvp.lissa import LissaSolver
from pairdots_server.core.ihvp.lowrank import LowRankSolver, fit_lowrank
from pairdots_server.core.influence import token_influence_exact, token_influence_fast
from pairdots_server.core.saliency import Target, TokenScore, grad_theta_word_score


def timed(fn: Callable[[], object], repeat: int = 1) -> tuple[float, object]:
    """Median wall time of ``repeat`` calls (after none warm-up; the caller warms up)."""
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bundle", help="prepared bundle dir; default: raw packaged MiniLM")
    ap.add_argument("--grad-batch", type=int, default=16, help="examples for vmap vs loop")
    ap.add_argument("--batch-size", type=int, default=8, help="curvature / LiSSA batch size")
    ap.add_argument("--n-curv", type=int, default=32, help="curvature examples (power it., fit)")
    ap.add_argument("--lissa-depth", type=int, default=200, help="LiSSA max steps")
    ap.add_argument("--lissa-tol", type=float, default=0.05)
    ap.add_argument("--damping-ratio", type=float, default=0.01)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--oversample", type=int, default=8)
    ap.add_argument("--power-iters", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3, help="timing repeats (median)")
    ap.add_argument(
        "--threads", type=int, default=1,
        help="torch threads (1: OpenMP spin-waits made 2 threads ~8x slower on a busy 2-core box)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n_load = max(args.grad_batch, args.n_curv)
    p = load_minilm_problem(args.bundle, n_load)
    fig: dict[str, float | str] = {"source": p.source}
    n_params = sum(t.numel() for t in p.params.values())
    log(f"{p.source}: P = {n_params} scoped parameters, threads {args.threads}")

    # per-example gradients
    b = args.grad_batch
    e, m, y = p.embeds[:b], p.mask[:b], p.labels[:b]
    per_example_loss_grads(p.logits_fn, p.params, e[:2], m[:2], y[:2])  # warm-up
    t_vmap, g_v = timed(lambda: per_example_loss_grads(p.logits_fn, p.params, e, m, y),
                        args.repeat)
    t_loop, g_l = timed(lambda: per_example_loss_grads_loop(p.logits_fn, p.params, e, m, y),
                        args.repeat)
    diff = float((g_v - g_l).abs().max() / g_l.abs().max())
    fig.update(grads_vmap_ms_per_example=1e3 * t_vmap / b,
               grads_loop_ms_per_example=1e3 * t_loop / b,
               grads_loop_over_vmap=t_loop / t_vmap, grads_vmap_vs_loop_max_rel_diff=diff)
    log(f"per-example grads, {b} examples: vmap {1e3 * t_vmap / b:.1f} ms/ex, loop "
        f"{1e3 * t_loop / b:.1f} ms/ex, loop/vmap {t_loop / t_vmap:.2f}, max rel diff {diff:.1e}")

    # curvature-vector products
    data = TensorBatches(p.embeds[: args.n_curv], p.mask[: args.n_curv],
                         p.labels[: args.n_curv], batch_size=args.batch_size)
    batch = Batch(p.embeds[: args.batch_size], p.mask[: args.batch_size],
                  p.labels[: args.batch_size])
    v = torch.randn(n_params, dtype=p.embeds.dtype)
    for curv in (Curvature.GGN, Curvature.HESSIAN):
        op = CurvatureOperator(p.logits_fn, p.params, data, curv)
        op.matvec(v, batch)
        t, _ = timed(lambda op=op: op.matvec(v, batch), args.repeat)
        fig[f"{curv.value}_vp_ms_batch{args.batch_size}"] = 1e3 * t
        log(f"{curv.value}-vector product, batch {args.batch_size}: {1e3 * t:.0f} ms")

    # ∇θ w
    positions = salient_word_positions(p)

    def grad_w() -> torch.Tensor:
        return grad_theta_word_score(p.logits_fn, p.params, p.test_embeds, p.test_mask,
                                     p.test_label, Target.LOG_PROB, TokenScore.GRAD_INPUT,
                                     positions)

    grad_w()
    t, gw = timed(grad_w, args.repeat)
    fig["grad_theta_w_ms"] = 1e3 * t
    log(f"∇θ w (double backprop): {1e3 * t:.0f} ms")

    # LiSSA vs low-rank
    op = CurvatureOperator(p.logits_fn, p.params, data, Curvature.GGN)
    t_pow, lam = timed(lambda: estimate_lambda_max(op, iters=args.power_iters), 1)
    lissa = LissaSolver(op, damping_ratio=args.damping_ratio, batch_size=args.batch_size,
                        depth=args.lissa_depth, tol=args.lissa_tol, lambda_max=float(lam),
                        progress=lissa_progress)
    damping, scale = lissa.resolve()
    res = lissa.solve(gw)
    d = res.diagnostics
    log(f"power iteration ({args.power_iters} it, {args.n_curv} ex): {t_pow:.1f}s, λ_max {lam:.4g}")
    log(f"LiSSA δ={damping:.3g} s={scale:.3g}: {d.iterations} steps in {d.seconds:.1f}s "
        f"({1e3 * d.seconds / d.iterations:.0f} ms/step), rel_change {d.rel_change:.3g}, "
        f"converged={d.converged}")
    t_fit, factors = timed(lambda: fit_lowrank(op, args.rank, args.oversample), 1)
    solver = LowRankSolver(factors, damping)
    solver.solve(gw)
    t_lr, _ = timed(lambda: solver.solve(gw), max(args.repeat, 5))
    log(f"low-rank fit k={args.rank} (+{args.oversample}): {t_fit:.1f}s; solve {1e3 * t_lr:.2f} ms;"
        f" LiSSA/low-rank solve ratio {d.seconds / t_lr:.0f}")
    fig.update(lambda_max=float(lam), power_iteration_s=t_pow, lissa_s=d.seconds,
               lissa_steps=d.iterations, lissa_ms_per_step=1e3 * d.seconds / d.iterations,
               lissa_rel_change=d.rel_change, lissa_converged=float(d.converged),
               lowrank_fit_s=t_fit, lowrank_solve_ms=1e3 * t_lr,
               lissa_over_lowrank=d.seconds / t_lr)

    # Eq. 8 for one training example
    i = 0
    length = int(p.mask[i].sum())
    ex_e, ex_m, ex_y = p.embeds[i : i + 1, :length], p.mask[i : i + 1, :length], int(p.labels[i])
    unk = p.unk_embed
    pos = list(range(1, length - 1))
    t_ex, r_ex = timed(lambda: token_influence_exact(p.logits_fn, p.params, res.x, ex_e, ex_m,
                                                     ex_y, unk, pos), 1)
    t_fa, r_fa = timed(lambda: token_influence_fast(p.logits_fn, p.params, res.x, ex_e, ex_m,
                                                    ex_y, unk, pos), 1)
    corr = float(torch.corrcoef(torch.stack([r_ex[pos], r_fa[pos]]))[0, 1])
    log(f"Eq. 8 on a {length}-token example: exact {1e3 * t_ex:.0f} ms, first-order "
        f"{1e3 * t_fa:.0f} ms, Pearson {corr:.3f}")
    fig.update(eq8_exact_ms=1e3 * t_ex, eq8_fast_ms=1e3 * t_fa, eq8_fast_vs_exact_pearson=corr)
    print(json.dumps(fig))


if __name__ == "__main__":
    main()
