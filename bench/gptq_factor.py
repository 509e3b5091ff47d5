"""GPTQ's per-layer linear algebra at the Llama shapes, today's engine against the forms it replaced, in one run:

* Hessian X^T X: float32 `addmm` on TF32 tensor cores (before) vs fp16 operands with float32 output on the
  fp16 tensor cores (`torch.addmm(..., out_dtype=torch.float32)`, now); both against a float64 product.
* The upper Cholesky factor of (H + damp I)^-1: the paper's three cuSOLVER calls chol(chol_inverse(chol(Hd)))
  (before) vs one Cholesky of the reversed matrix and one triangular solve (`inverse_hessian_factor`, now);
  relative difference of the factors, and GPTQ's layer error tr(dW H dW^T) with each factor on the same W
  (equal error is the claim: same algorithm, other rounding).

    python -P bench/gptq_factor.py --out DIR [--sizes 4096,14336,28672] [--tokens 32768]

Runs on the CPU at tiny sizes (`--sizes 256,512 --tokens 2048`) as a smoke test. Writes DIR/gptq_factor.json
and .md; the last line printed starts with SUMMARY.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).resolve().parent))
from gptq_speed import _import_root  # noqa: E402  (makes qaas.* importable from this checkout)

_import_root()


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, reps: int = 3) -> tuple[float, object]:
    out = fn()  # warm-up (handles, workspaces)
    ts = []
    for _ in range(reps):
        _sync()
        t = time.perf_counter()
        out = fn()
        _sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


def three_step_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """The paper's form (and this engine's before): upper chol of cholesky_inverse(chol(H + damp I))."""
    Hd = H.clone()
    Hd.diagonal().add_(damp * H.diagonal().mean())
    L = torch.linalg.cholesky(Hd)
    return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)


def one_solve_factor(H: torch.Tensor, damp: float) -> torch.Tensor:
    """The engine's form before the column-block inverse: chol of the reversed matrix, then one triangular solve
    against the whole identity (n^3 flops in cuBLAS's trsm)."""
    M = torch.flip(H, (0, 1))
    M.diagonal().add_(damp * H.diagonal().mean())
    L = torch.linalg.cholesky(M)
    return torch.flip(torch.linalg.solve_triangular(L, torch.eye(H.shape[0], device=H.device), upper=False), (0, 1))


def main() -> int:
    from qaas.worker.engine.gptq_algorithm import HessianFactor, gptq_quantize, inverse_hessian_factor
    from qaas.worker.engine.hessian import HessianAccumulator, tf32_matmuls, uses_half_tensor_cores
    from support.gptq_paper import layer_error

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--sizes", default="4096,14336,28672")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--rows", type=int, default=4096, help="output features of the quantized test layer")
    ap.add_argument("--damp", type=float, default=0.01)
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    half = torch.float16 if cuda else torch.float32
    rows = []
    for n in (int(s) for s in a.sizes.split(",")):
        g = torch.Generator(device=dev).manual_seed(n)
        scale = torch.exp(torch.randn(n, device=dev, generator=g) * 0.7)
        X = (torch.randn(a.tokens, n, device=dev, generator=g) * scale).to(half)
        row: dict = {"n": n, "tokens": a.tokens}

        def tf32_path():
            H = torch.zeros(n, n, device=dev)
            with tf32_matmuls(cuda):
                H.addmm_(X.float().t(), X.float())
            return H

        def engine_path():
            acc = HessianAccumulator(n, dev)
            acc.add(X)
            return acc.gram()

        row["hessian_tf32_s"], H32 = timed(tf32_path)
        row["hessian_now_s"], Hnow = timed(engine_path)
        if n <= 16384:  # float64 reference (1 s of fp64 at 14336; skipped above)
            Xd = X.double()
            Href = Xd.t() @ Xd
            del Xd
            row["hessian_tf32_rel_err"] = float((H32.double() - Href).norm() / Href.norm())
            row["hessian_now_rel_err"] = float((Hnow.double() - Href).norm() / Href.norm())
            del Href
        row["hessian_now_vs_tf32_rel"] = float((Hnow - H32).norm() / H32.norm())
        row["hessian_on_half_tensor_cores"] = uses_half_tensor_cores()
        del X, H32
        H = Hnow.mul_(2.0 / a.tokens)
        if dev.type == "cuda":
            torch.cuda.empty_cache()

        row["factor_three_step_s"], U_old = timed(lambda: three_step_factor(H, a.damp))
        row["factor_one_solve_s"], U_one = timed(lambda: one_solve_factor(H, a.damp))
        row["factor_now_s"], (U_new, _, _) = timed(lambda: inverse_hessian_factor(H, a.damp))
        row["factor_rel_diff"] = float((U_new - U_old).norm() / U_old.norm())
        row["factor_now_vs_one_solve_rel_diff"] = float((U_new - U_one).norm() / U_one.norm())
        del U_one
        W = (torch.randn(a.rows, n, device=dev, generator=g) * 0.02).to(half).float()
        errs = {}
        for name, U in (("three_step", U_old), ("now", U_new)):
            f = HessianFactor(dead=torch.zeros(n, dtype=torch.bool, device=dev), perm=None, Hinv=U,
                              damp_percent=a.damp, notes=[])
            res = gptq_quantize(W, H, bits=4, group_size=128, damp_percent=a.damp, factor=f)
            errs[name] = layer_error(W, res.Q, H)
            del res
        row["layer_error_three_step"] = errs["three_step"]
        row["layer_error_now"] = errs["now"]
        row["layer_error_ratio"] = errs["now"] / errs["three_step"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        del H, U_old, U_new, W
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    info = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": "python -P bench/gptq_factor.py " + " ".join(sys.argv[1:])}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gptq_factor.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    L = [f"# GPTQ linear algebra: before vs now ({info['device']}, torch {info['torch']}, {info['date']})", "",
         f"Command: `{info['command']}`", "",
         "| n | Hessian TF32 s | now (fp16 TC) s | rel err TF32 / now vs fp64 | factor 3-step s | one solve s | "
         "now (column blocks) s | factor rel diff | layer error now / 3-step |",
         "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = (f"{r['hessian_tf32_rel_err']:.1e} / {r['hessian_now_rel_err']:.1e}" if "hessian_now_rel_err" in r
             else f"now vs TF32 {r['hessian_now_vs_tf32_rel']:.1e}")
        L.append(f"| {r['n']} | {r['hessian_tf32_s']:.4f} | {r['hessian_now_s']:.4f} | {e} | "
                 f"{r['factor_three_step_s']:.4f} | {r['factor_one_solve_s']:.4f} | {r['factor_now_s']:.4f} | {r['factor_rel_diff']:.1e} | "
                 f"{r['layer_error_ratio']:.6f} |")
    (out / "gptq_factor.md").write_text("\n".join(L) + "\n")
    print("\n".join(L))
    print("SUMMARY " + "; ".join(
        f"n={r['n']}: Hessian {r['hessian_tf32_s'] / r['hessian_now_s']:.1f}x, factor "
        f"{r['factor_three_step_s'] / r['factor_now_s']:.1f}x, error ratio {r['layer_error_ratio']:.5f}" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
