"""VRAM: what an instance will need, whether its GPUs have room, and what it really took.

Estimate (bytes, for the GPUs of one instance), from the model's GGUF header:

    weights  = bytes of the tensors of the offloaded layers. llama.cpp counts the output layer
               first: n_gpu_layers = N puts the output tensors (output.weight, output_norm,
               ...) and the last N - 1 of the `<arch>.block_count` blocks ("blk.N.*") on the
               GPUs; unset, "auto", "all" or N > block_count is everything (measured:
               vram-third-shape.md §5, src/llama-model.cpp's i_gpu_start). token_embd stays
               on the CPU, except that a model without output.weight (tied embeddings) gets a
               GPU copy of it for the output.
    kv       = n_ctx * sum over offloaded layers of n_head_kv * (key_length + value_length) * 2
               (f16 cache). n_ctx is ctx_size, or the trained `<arch>.context_length` when
               ctx_size is 0 or unset (llama-server's default), padded up to 256 like llama.cpp.
               key/value_length default to embedding_length / head_count. Sliding-window
               layers are counted at full length: an overestimate, never an underestimate.
    compute  = ffn + 2 * n_ub * n_ctx                                  flash attention on
               max(ffn + 4 * n_ub * n_ctx,                               flash_attn = "off"
                   4 * n_ub * (n_embd + 4 * q + 2 * kv + (n_head + 1) * n_ctx))
               ffn = 4 * n_ub * (4 * n_embd + 3 * n_ff): the f32 activations at the FFN's
               peak; with FA off the f32 KQ matrix and mask replace that peak; q = n_head *
               head_dim and kv = n_head_kv * head_dim are the Q and K/V widths. n_ub = 512
               (llama-server's n_ubatch), counted once per instance. The logits
               (4 * n_seq * n_vocab) live in pinned host memory, not on the GPU.
               With some blocks on the CPU the scheduler still runs their big matmuls on the
               GPU (op offload), copying the weight and a CPU layer's K/V into the compute
               buffer: counted as the largest tensor of a CPU block plus one layer's KV, a
               bound that held with 27-151 MiB to spare on 8 measured runs (§5), not derived.
    mmproj   = the size of the mmproj file (its tensors go to the first GPU).
    overhead = 708 MiB per GPU: the runtime context at idle (588 MiB) and what the first
               prompt adds (BLAS handle and workspace, up to 116 MiB seen). Measured on CUDA; the
               ROCm figure is not measured yet (see the constants).
    pool     = with flash_attn = "off" only, per GPU: the f16 copy of the KQ matrix that the
               non-FA path allocates from ggml's memory pool for every ubatch. HIP builds use
               the legacy pool (GGML_HIP_NO_VMM is on by default), which keeps every buffer it
               ever allocated (5% larger than asked) until one of its own allocations fails:
               a prompt that fills the context leaves one buffer per size reached, about
               14.5 GiB at 32k context with 32 heads (`pool_bytes` replays that). A VMM
               pool (CUDA) keeps only the largest, 2 * n_ub * n_ctx * n_head. The longest
               prompt is n_ctx, capped at the trained context as llama-server caps its slots.
               `flash_attn` unset or "auto" is counted as on: llama.cpp enables it where the
               GPU supports it, and mi50d sets it on for gfx906 instances (`host.flashattn`).

With several GPUs, llama.cpp splits layers in proportion to each GPU's total VRAM, so the
estimate minus overhead is split that way and each GPU also gets its overhead and pool. (Read
from the source since: llama.cpp splits by each GPU's free memory at load, whole layers, output on
the last GPU; vram-third-shape.md §7. Not modelled here yet.)

Room on a GPU = total - max(used according to sysfs, what other instances hold there). The pool
need not fit to start (it only grows with long prompts, and frees its cache when one of its own
allocations fails), but `check_fit` warns whenever it is counted, saying how much it may keep.
Instances that are running already appear in sysfs `used`; the recorded holdings cover those still
loading, which have not allocated yet. Adding both would count running instances twice.

`parse_buffers` reads the buffer sizes llama-server logs after loading, so the supervisor can
replace an estimate with what the instance really holds.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from mi50d.config import InstanceConfig
from mi50d.host.checks import Check, fail, ok, skip, warn
from mi50d.host.ggufmeta import GGUFError, GGUFInfo
from mi50d.host.gpus import Gpu

MiB = 1 << 20
GiB = 1 << 30
# --- the estimate's constants, each with the measurement it comes from ----------------------
# Measured on llama.cpp's CUDA backend (ggml-cuda, the source hipcc compiles for the MI50) on one
# H200, 2026-12-02, three models (4 MB, 2.0 GB F16, 7.7 GB Q8_0) at ctx 4096/32768, FA on/off:
# ../shared/research/gpu-vram-cuda.md §4 (idle buffers) and §5 (after real prompts).
N_UBATCH = 512  # llama-server's default n_ubatch
N_SEQ = 4  # llama-server's default slots
CTX_PAD = 256
# The process's GPU memory at idle beyond its model, KV and compute buffers: 586.7-588.7 MiB on
# CUDA 13 / H200 whatever the model (§4). NOT MEASURED ON ROCm: a HIP context on gfx906 loads its
# own code objects; it needs one KFD reading of an idle instance on a real MI50.
IDLE_OVERHEAD = 588 * MiB
# Added by the first prompt: +12 MiB (Q8_0, MMQ kernels) to +108 MiB with the VMM pool and +116
# MiB with the legacy one (F16: cuBLAS's handle and 32 MiB workspace on the first batched
# matmul) (§5). rocBLAS's counterpart (its handle, and the Tensile kernels it loads on the first
# GEMM) is not measured.
FIRST_USE = 120 * MiB
OVERHEAD_PER_GPU = IDLE_OVERHEAD + FIRST_USE
# The compute buffer's shape, fitted to the measured CUDA0 compute buffers of five shapes (the
# research's 1B and 8B; docs/research/vram-third-shape.md §4.1: Llama-3.2-3B-,
# Qwen2.5-32B- and Qwen3-32B-like, GQA 3/5/8, Q width 8192 != n_embd): FA on exact to 0.01 MiB
# on all five, FA off exact on four and 2 MiB high on the Qwen3 shape. 3 n_ff-wide f32 tensors
# at the FFN's peak; with FA off, n_embd + 4 Q + 2 K/V widths of f32 activations beside the
# (n_head + 1)-wide f32 KQ matrix and mask. A fit of the allocator's peak, not a derivation.
FFN_TENSORS = 3
FA_OFF_Q = 4
FA_OFF_KV = 2
# ggml_cuda_pool_leg (ggml-cuda.cu) rounds each new buffer up to 1.05x the request, aligned to
# 256 bytes; replaying it gives 14851 MiB for the 32256-token prompt that grew the legacy pool
# by 14990 MiB (of which ~88 MiB was cuBLAS's first use) (§5).
POOL_LOOK_AHEAD = 1.05
POOL_ALIGN = 256
MAX_LAYERS = 512  # llama.cpp's LLAMA_MAX_LAYERS: the estimate's work is bounded by it
_LAYER = re.compile(r"^blk\.(\d+)\.")
# e.g. "load_tensors:   CPU_Mapped model buffer size =    70.31 MiB", possibly after a
# "0.00.012.255 I " timestamp prefix; kinds: model, KV, compute, output, RS.
# Linear in the line's length: the look-behind starts `func` only at the start of a word, and the
# possessive quantifiers never hand characters back (`\w+` alone retried from every position of a
# long word, quadratic: 64 KiB of letters took 10 s). Lines are scanned up to MAX_SCAN characters.
_BUFFER = re.compile(
    r"(?<!\w)(?P<func>\w++): +(?P<device>\S++) +(?P<kind>model|KV|compute|output|RS) buffer "
    r"size = +(?P<mib>[0-9.]++) MiB")
MAX_SCAN = 4096
_GPU_DEVICE = re.compile(r"^(?:ROCm|CUDA|HIP)(\d+)")


def gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


@dataclass(frozen=True)
class Estimate:
    """Bytes an instance needs on its GPUs; `*_all` count every layer wherever it runs."""

    weights: int
    kv: int
    compute: int
    mmproj: int
    overhead: int
    n_ctx: int
    gpu_layers: int
    n_layer: int
    weights_all: int
    kv_all: int
    compute_all: int
    pool: int = 0  # flash_attn = "off": what the memory pool may keep (all GPUs)
    flash_attn: bool = True  # as counted: on unless the instance sets "off"

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute + self.mmproj + self.overhead + self.pool

    def split(self, totals: Mapping[int, int]) -> dict[int, int]:
        """Bytes per GPU index, the work split in proportion to each GPU's total VRAM; the
        overhead and the pool are each GPU's own."""
        if not totals:
            return {}
        per_gpu = (self.overhead + self.pool) // len(totals)
        work = self.total - self.overhead - self.pool
        whole = sum(totals.values()) or 1
        return {i: work * t // whole + per_gpu for i, t in totals.items()}

    def to_json(self) -> dict[str, int]:
        return {"total": self.total, "weights": self.weights, "kv": self.kv,
                "compute": self.compute, "mmproj": self.mmproj, "overhead": self.overhead,
                "pool": self.pool, "flash_attn": int(self.flash_attn), "n_ctx": self.n_ctx,
                "gpu_layers": self.gpu_layers, "n_layer": self.n_layer}


def _per_layer(value: object, n_layer: int) -> list[int]:
    if isinstance(value, list):
        return [int(v) if isinstance(v, int) else 0 for v in value][:n_layer]
    return [value if isinstance(value, int) else 0] * n_layer


def gpu_layer_count(n_gpu_layers: int | str | None, n_layer: int) -> int:
    """How many layers go to the GPUs, the output layer counted first: 1 is the output layer
    alone, n_layer + 1 everything."""
    if n_gpu_layers is None or n_gpu_layers in ("auto", "all"):
        return n_layer + 1
    return min(int(n_gpu_layers), n_layer + 1)


def context_size(inst: InstanceConfig, model: GGUFInfo) -> int:
    n_ctx = inst.ctx_size or model.arch_int("context_length") or 4096
    return -(-n_ctx // CTX_PAD) * CTX_PAD


def estimate(inst: InstanceConfig, model: GGUFInfo, mmproj_bytes: int = 0,
             n_gpus: int = 1, *, legacy_pool: bool = True) -> Estimate:
    """The formula in the module docstring; `n_gpus` 0 means a CPU-only instance. Raises
    GGUFError for a block_count llama.cpp would refuse (its work and memory follow that count)."""
    n_layer = model.arch_int("block_count") or 0
    if not 0 <= n_layer <= MAX_LAYERS:
        raise GGUFError(f"{model.architecture}.block_count = {n_layer}, but llama.cpp allows "
                        f"0 to {MAX_LAYERS} layers: corrupt")
    offloaded = gpu_layer_count(inst.n_gpu_layers, n_layer) if n_gpus else 0
    blocks = min(max(offloaded - 1, 0), n_layer)
    first_gpu_layer = n_layer - blocks
    output_on_gpu = offloaded >= 1
    weights = 0
    cpu_tensor = 0  # the largest tensor of a block left on the CPU (op offload copies it)
    names = {t.name for t in model.tensors}
    for t in model.tensors:
        layer = _LAYER.match(t.name)
        if layer:
            on_gpu = int(layer.group(1)) >= first_gpu_layer
            weights += t.nbytes if on_gpu else 0
            cpu_tensor = cpu_tensor if on_gpu else max(cpu_tensor, t.nbytes)
        elif t.name.startswith("token_embd."):
            tied = t.name == "token_embd.weight" and "output.weight" not in names
            weights += t.nbytes if tied and output_on_gpu else 0
        elif output_on_gpu:
            weights += t.nbytes
    n_embd = model.arch_int("embedding_length") or 0
    n_head = _per_layer(model.arch_value("attention.head_count"), n_layer)
    n_head_kv = _per_layer(model.arch_value("attention.head_count_kv")
                           or model.arch_value("attention.head_count"), n_layer)
    head_dim = n_embd // max(max(n_head, default=1), 1)
    k_len = model.arch_int("attention.key_length") or head_dim
    v_len = model.arch_int("attention.value_length") or head_dim
    n_ctx = context_size(inst, model)
    kv_layers = [n_ctx * h * (k_len + v_len) * 2 for h in n_head_kv]
    kv = sum(kv_layers[first_gpu_layer:]) if n_gpus else 0
    n_ff = max(_per_layer(model.arch_value("feed_forward_length"), n_layer), default=0)
    heads = max(n_head, default=0)
    flash = inst.flash_attn != "off"
    heads_kv = max(n_head_kv, default=0)
    compute = compute_bytes(n_embd, n_ff, heads, heads_kv, k_len, n_ctx, flash)
    if offloaded > 0 and blocks < n_layer:
        compute += cpu_tensor + kv_layers[0]
    prompt = min(n_ctx, context_size_trained(model) or n_ctx)
    pool = 0 if flash or not offloaded else pool_bytes(prompt, heads, legacy=legacy_pool)
    return Estimate(
        weights=weights, kv=kv, compute=compute if offloaded else 0,
        mmproj=mmproj_bytes if n_gpus else 0, overhead=OVERHEAD_PER_GPU * n_gpus,
        n_ctx=n_ctx, gpu_layers=blocks, n_layer=n_layer,
        weights_all=model.tensor_bytes, kv_all=sum(kv_layers), compute_all=compute,
        pool=pool * n_gpus, flash_attn=flash,
    )


def compute_bytes(n_embd: int, n_ff: int, n_head: int, n_head_kv: int, head_dim: int,
                  n_ctx: int, flash_attn: bool) -> int:
    """The GPU compute buffer of one instance (module docstring)."""
    ffn = 4 * N_UBATCH * (4 * n_embd + FFN_TENSORS * n_ff)
    if flash_attn:
        return ffn + 2 * N_UBATCH * n_ctx
    widths = n_embd + FA_OFF_Q * n_head * head_dim + FA_OFF_KV * n_head_kv * head_dim
    return max(ffn + 4 * N_UBATCH * n_ctx, 4 * N_UBATCH * (widths + (n_head + 1) * n_ctx))


def pool_bytes(n_prompt: int, n_head: int, *, legacy: bool = True) -> int:
    """What ggml's pool holds for the f16 KQ copies after a prompt of `n_prompt` tokens, with
    flash attention off: the legacy pool (HIP's default) keeps one buffer per size it reached,
    a VMM pool only the largest. Work is bounded by the number of buffers (~80 at 1M tokens):
    each step jumps to the first ubatch its newest buffer cannot serve."""
    unit = 2 * N_UBATCH * n_head  # bytes per KV cell
    if n_prompt <= 0 or unit == 0:
        return 0
    if not legacy:
        return unit * n_prompt
    held, n_kv = 0, min(N_UBATCH, n_prompt)
    while True:
        size = -(-int(POOL_LOOK_AHEAD * unit * n_kv) // POOL_ALIGN) * POOL_ALIGN
        held += size
        serves = size // unit  # KV cells the new buffer can hold
        if serves >= n_prompt:
            return held
        n_kv = min((serves // N_UBATCH + 1) * N_UBATCH, n_prompt)


def context_size_trained(model: GGUFInfo) -> int:
    """The trained context, padded as llama-server pads its slots; 0 when the header has none."""
    trained = model.arch_int("context_length") or 0
    return -(-trained // CTX_PAD) * CTX_PAD


def _array_length(model: GGUFInfo, key: str) -> int:
    value = model.metadata.get(key)
    if isinstance(value, list):
        return len(value)
    return int(getattr(value, "length", 0))


def check_fit(est: Estimate, gpus: Sequence[Gpu], held: Mapping[str, Mapping[int, int]], *,
              force: bool = False, name: str = "vram") -> Check:
    """Whether `est` fits on `gpus` next to what other instances hold (`held`: instance name ->
    GPU index -> bytes). One line with the numbers when it does not; a warning under force."""
    if not gpus or est.total == 0:
        return skip(name, "no GPU memory needed (CPU only)")
    totals = {g.index: g.vram_total for g in gpus if g.vram_total is not None}
    if len(totals) != len(gpus):
        return skip(name, "VRAM size unknown (no mem_info_vram_total in sysfs)")
    shares = est.split(totals)
    pool = est.pool // len(gpus)
    data = {"estimate": est.to_json(), "per_gpu": {str(i): b for i, b in shares.items()}}
    grows: list[str] = []
    for gpu in gpus:
        others = {n: h[gpu.index] for n, h in held.items() if h.get(gpu.index)}
        used = max(gpu.vram_used or 0, sum(others.values()))
        room = max(totals[gpu.index] - used, 0)
        need = shares[gpu.index] - pool  # the pool grows later, and gives back when it must
        if need <= room:
            if pool and shares[gpu.index] > room:
                grows.append(f"GPU {gpu.index} has {gib(room)} free")
            continue
        holders = "; ".join(f"{n} holds {gib(b)}" for n, b in sorted(others.items()))
        text = (f"needs ~{gib(need)}" + (f" on GPU {gpu.index}" if len(gpus) > 1 else "")
                + f", GPU {gpu.index} has {gib(room)} free" + (f"; {holders}" if holders else ""))
        if force:
            return warn(name, text + " (force_vram = true: starting anyway)", None, **data)
        stop = f", stop {', '.join(sorted(others))}" if others else ""
        flash = "" if est.flash_attn else "set flash_attn = \"on\", "
        return fail(name, text, f"{flash}lower ctx_size (now {est.n_ctx}) or n_gpu_layers{stop}, "
                    "or set force_vram = true to start anyway", **data)
    where = ", ".join(f"GPU {i} ~{gib(b - pool)}" for i, b in shares.items())
    if pool:
        past = f", past what is free ({'; '.join(grows)})" if grows else ""
        return warn(name, f"needs ~{gib(est.total - est.pool)} ({where}), fits; with "
                    f"flash_attn = \"off\" HIP's memory pool may then keep up to "
                    f"~{gib(pool)} more per GPU after long prompts{past}, memory other "
                    "instances can no longer get", "set flash_attn = \"on\" (llama.cpp's HIP build "
                    "has flash-attention kernels for gfx906; mi50d's default there)", **data)
    return ok(name, f"needs ~{gib(est.total)} ({where}), fits", **data)


@dataclass(frozen=True)
class Buffer:
    kind: str  # model, KV, compute, output or RS
    device: str  # ROCm0, CPU, CPU_Mapped, ROCm_Host, ...
    size: int  # bytes

    @property
    def gpu(self) -> int | None:
        """The device's index among the GPUs the process sees, for ROCm<i>/CUDA<i>."""
        m = _GPU_DEVICE.match(self.device)
        return int(m.group(1)) if m and "Host" not in self.device else None


@dataclass(frozen=True)
class Measured:
    buffers: tuple[Buffer, ...]

    def bytes(self, kind: str | None = None) -> int:
        return sum(b.size for b in self.buffers if kind is None or b.kind == kind)

    def per_gpu(self, visible: Sequence[int] | None = None) -> dict[int, int]:
        """Bytes per GPU index; `visible` maps the process's i-th GPU to a host index (the
        instance's `gpus`, since ROCR_VISIBLE_DEVICES renumbers from 0)."""
        result: dict[int, int] = {}
        for b in self.buffers:
            if b.gpu is None:
                continue
            index = visible[b.gpu] if visible is not None and b.gpu < len(visible) else b.gpu
            result[index] = result.get(index, 0) + b.size
        return result


def parse_buffers(lines: Iterable[str]) -> Measured:
    """The buffers of the last model load in llama-server's output. A model buffer line after
    other buffer lines starts a new load (llama-server may load twice, e.g. to fit memory)."""
    current: list[Buffer] = []
    for line in lines:
        if "buffer size" not in line:
            continue
        m = _BUFFER.search(line[:MAX_SCAN])
        if not m:
            continue
        buf = Buffer(m.group("kind"), m.group("device"), round(float(m.group("mib")) * MiB))
        if buf.kind == "model" and any(b.kind != "model" for b in current):
            current = []
        current.append(buf)
    return Measured(tuple(current))


def estimate_error(est: Estimate, measured: Measured) -> dict[str, float]:
    """Relative error (estimate / measured - 1) per part, all layers counted wherever they ran;
    for checking the formula against a real (e.g. CPU) llama-server."""
    pairs = {"weights": (est.weights_all, measured.bytes("model")),
             "kv": (est.kv_all, measured.bytes("KV")),
             "compute": (est.compute_all, measured.bytes("compute"))}
    return {k: (e / m - 1 if m else float("inf")) for k, (e, m) in pairs.items()}
