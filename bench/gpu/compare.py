"""mi50d's VRAM estimate vs what llama-server's CUDA build allocated (runs.csv from measure.py).

    .venv/bin/python -m bench.gpu.compare RESULTS_DIR MODELS_DIR

MODELS_DIR holds NAME.header and NAME.json as genmodel.py wrote them; each header is padded out
to a sparse NAME.gguf of the real size, so `read_gguf` sees the same header and size as on the GPU
machine. Prints markdown tables (MiB) for docs/research/vram-third-shape.md. The "fit" columns are
the compute formula fitted in shared/research/gpu-vram-cuda.md §7 and its generalisation in the
doc; they are computed here, not in mi50d.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from mi50d.config import InstanceConfig
from mi50d.host.ggufmeta import GGUFInfo, read_gguf
from mi50d.host.vram import N_UBATCH, Estimate, MiB, estimate


def model_file(models: Path, name: str) -> Path:
    info = json.loads((models / f"{name}.json").read_text())
    path = models / f"{name}.gguf"
    if not path.is_file() or path.stat().st_size != info["file_bytes"]:
        with path.open("wb") as f:
            f.write((models / f"{name}.header").read_bytes())
            f.truncate(info["file_bytes"])
    return path


def compute_fits(model: GGUFInfo, n_ctx: int, fa: str) -> tuple[float, float]:
    """(research doc §7 formula, the generalised one) for the CUDA0 compute buffer, in bytes."""
    e = model.arch_int("embedding_length") or 0
    h = model.arch_int("attention.head_count") or 1
    hkv = model.arch_int("attention.head_count_kv") or h
    d = model.arch_int("attention.key_length") or e // h
    ff = model.arch_int("feed_forward_length") or 0
    ub = N_UBATCH
    ffn = 4 * ub * (4 * e + 3 * ff)
    if fa == "on":
        return ffn + 2 * ub * n_ctx, ffn + 2 * ub * n_ctx
    doc = max(ffn + 4 * ub * n_ctx, 4 * ub * (5.5 * e + (h + 1) * n_ctx))
    new = max(ffn + 4 * ub * n_ctx, 4 * ub * (e + 4 * h * d + 2 * hkv * d + (h + 1) * n_ctx))
    return doc, new


def buffers(text: str) -> dict[str, float]:
    """Buffers of the last load (with -v the fit dry run's lines come first, as in parse_buffers)."""
    out: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in text.split(";"))):
        device, kind, mib = item.split()
        if kind == "model" and any(not k.endswith(" model") for k in out):
            out = {}
        out[f"{device} {kind}"] = out.get(f"{device} {kind}", 0.0) + float(mib)
    return out


def corrected_total(model: GGUFInfo, w: float, kv: float, new_compute: float, n_ctx: int,
                    fa: str) -> float:
    """gpu-vram-cuda.md §7.4's peak formula, with the generalised compute term (MiB)."""
    h = model.arch_int("attention.head_count") or 1
    pool = 2 * N_UBATCH * n_ctx * h / MiB if fa == "off" else 0.0
    return w + kv + new_compute / MiB + 700 + pool


def fmt(est: float, meas: float | None) -> str:
    if meas is None:
        return f"{est:.2f} / —"
    err = est - meas
    rel = f", {err / meas:+.1%}" if meas and abs(err) >= 0.005 else ""
    return f"{est:.2f} / {meas:.2f} ({err:+.2f}{rel})"


def main(argv: list[str]) -> int:
    results, models = Path(argv[0]), Path(argv[1])
    with (results / "runs.csv").open() as f:
        rows = list(csv.DictReader(f))
    cache: dict[str, GGUFInfo] = {}
    print("| run | weights est / meas | KV est / meas | compute est / meas | compute fit §7 / new "
          "| overhead est / meas idle | total est / proc idle | proc after 3000 / 32256 tok "
          "| §7.4 total (new compute) / peak |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = r["model"]
        if name not in cache:
            cache[name] = read_gguf(model_file(models, name))
        model = cache[name]
        keys: dict[str, object] = {"model": str(models / f"{name}.gguf"), "port": 8080, "name": "m",
                                   "source": str(models / "m.toml")}
        if r["ctx"]:
            keys["ctx_size"] = int(r["ctx"])
        if r["fa"]:
            keys["flash_attn"] = r["fa"]
        if r["ngl"]:
            keys["n_gpu_layers"] = r["ngl"] if r["ngl"] == "all" else int(r["ngl"])
        est: Estimate = estimate(InstanceConfig.model_validate(keys), model)
        b = buffers(r["buffers"])
        if not b:
            print(f"| {r['config']} | failed to load (rc {r['rc']}) | | | | | est {est.total / MiB:.0f} "
                  f"| free before {r['free_before_mib']} |")
            continue
        w, kv, comp = b.get("CUDA0 model", 0.0), b.get("CUDA0 KV", 0.0), b.get("CUDA0 compute", 0.0)
        doc, new = compute_fits(model, est.n_ctx, r["fa"] or "auto")
        idle = float(r["idle_proc"]) if r["idle_proc"] else None
        over = idle - w - kv - comp if idle is not None else None
        after = f"{r['p3000_proc'] or '—'} / {r['p32k_proc'] or '—'}"
        peak = max(float(r[k]) for k in ("idle_proc", "p3000_proc", "p32k_proc") if r[k])
        corr = corrected_total(model, w, kv, new, est.n_ctx, r["fa"] or "auto")
        print(f"| {r['config']} | {fmt(est.weights / MiB, w)} | {fmt(est.kv / MiB, kv)} "
              f"| {fmt(est.compute / MiB, comp)} | {doc / MiB:.2f} / {new / MiB:.2f} "
              f"| {fmt(est.overhead / MiB, over)} | {fmt(est.total / MiB, idle)} | {after} "
              f"| {corr:.0f} / {peak:.0f} ({corr - peak:+.0f}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
