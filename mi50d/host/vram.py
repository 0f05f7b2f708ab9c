"""VRAM: what an instance will need, whether its GPUs have room, and what it really took.

Estimate (bytes, for the GPUs of one instance), from the model's GGUF header:

    weights  = bytes of the tensors of the offloaded layers: the last `n_gpu_layers` of the
               `<arch>.block_count` blocks ("blk.N.*"), plus the output tensors (output.weight,
               output_norm, ...) when all blocks are offloaded (unset, "auto", "all", or
               n_gpu_layers > block_count). token_embd stays on the CPU, except that a model
               without output.weight (tied embeddings) gets a GPU copy of it for the output.
    kv       = n_ctx * sum over offloaded layers of n_head_kv * (key_length + value_length) * 2
               (f16 cache). n_ctx is ctx_size, or the trained `<arch>.context_length` when
               ctx_size is 0 or unset (llama-server's default), padded up to 256 like llama.cpp.
               key/value_length default to embedding_length / head_count. Sliding-window
               layers are counted at full length: an overestimate, never an underestimate.
    compute  = 4 * n_ubatch * (4 * n_embd + 2 * n_ff)     f32 activations of one ubatch
               + 4 * n_seq * n_vocab                       logits of the last token per slot
               + 2 * n_ubatch * n_ctx                      the f16 KQ mask
               + 4 * n_ubatch * n_ctx * n_head             the f32 KQ matrix, only with
                                                           flash_attn = "off"
               with n_ubatch = 512 and n_seq = 4 (llama-server's defaults: 4 slots, and only
               one output per slot is reserved), counted once per instance.
    mmproj   = the size of the mmproj file (its tensors go to the first GPU).
    overhead = 384 MiB per GPU: the HIP runtime context and rocBLAS workspace.

With several GPUs, llama.cpp splits layers in proportion to each GPU's total VRAM, so the
estimate minus overhead is split that way and each GPU also gets its overhead.

Room on a GPU = total - max(used according to sysfs, what other instances hold there).
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
N_UBATCH = 512
N_SEQ = 4
CTX_PAD = 256
OVERHEAD_PER_GPU = 384 * MiB
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

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute + self.mmproj + self.overhead

    def split(self, totals: Mapping[int, int]) -> dict[int, int]:
        """Bytes per GPU index, the work split in proportion to each GPU's total VRAM."""
        if not totals:
            return {}
        per_gpu = self.overhead // len(totals)
        work = self.total - self.overhead
        whole = sum(totals.values()) or 1
        return {i: work * t // whole + per_gpu for i, t in totals.items()}

    def to_json(self) -> dict[str, int]:
        return {"total": self.total, "weights": self.weights, "kv": self.kv,
                "compute": self.compute, "mmproj": self.mmproj, "overhead": self.overhead,
                "n_ctx": self.n_ctx, "gpu_layers": self.gpu_layers, "n_layer": self.n_layer}


def _per_layer(value: object, n_layer: int) -> list[int]:
    if isinstance(value, list):
        return [int(v) if isinstance(v, int) else 0 for v in value][:n_layer]
    return [value if isinstance(value, int) else 0] * n_layer


def gpu_layer_count(n_gpu_layers: int | str | None, n_layer: int) -> int:
    """How many blocks go to the GPUs; n_layer + 1 means the output layer too."""
    if n_gpu_layers is None or n_gpu_layers in ("auto", "all"):
        return n_layer + 1
    return min(int(n_gpu_layers), n_layer + 1)


def context_size(inst: InstanceConfig, model: GGUFInfo) -> int:
    n_ctx = inst.ctx_size or model.arch_int("context_length") or 4096
    return -(-n_ctx // CTX_PAD) * CTX_PAD


def estimate(inst: InstanceConfig, model: GGUFInfo, mmproj_bytes: int = 0,
             n_gpus: int = 1) -> Estimate:
    """The formula in the module docstring; `n_gpus` 0 means a CPU-only instance. Raises
    GGUFError for a block_count llama.cpp would refuse (its work and memory follow that count)."""
    n_layer = model.arch_int("block_count") or 0
    if not 0 <= n_layer <= MAX_LAYERS:
        raise GGUFError(f"{model.architecture}.block_count = {n_layer}, but llama.cpp allows "
                        f"0 to {MAX_LAYERS} layers: corrupt")
    offloaded = gpu_layer_count(inst.n_gpu_layers, n_layer) if n_gpus else 0
    first_gpu_layer = n_layer - min(offloaded, n_layer)
    output_on_gpu = offloaded > n_layer
    weights = 0
    names = {t.name for t in model.tensors}
    for t in model.tensors:
        layer = _LAYER.match(t.name)
        if layer:
            weights += t.nbytes if int(layer.group(1)) >= first_gpu_layer else 0
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
    n_vocab = model.arch_int("vocab_size") or _array_length(model, "tokenizer.ggml.tokens")
    n_ff = _per_layer(model.arch_value("feed_forward_length"), n_layer)
    compute = (4 * N_UBATCH * (4 * n_embd + 2 * max(n_ff, default=0)) + 4 * N_SEQ * n_vocab
               + 2 * N_UBATCH * n_ctx)
    if inst.flash_attn == "off":
        compute += 4 * N_UBATCH * n_ctx * max(n_head, default=0)
    return Estimate(
        weights=weights, kv=kv, compute=compute if offloaded else 0,
        mmproj=mmproj_bytes if n_gpus else 0, overhead=OVERHEAD_PER_GPU * n_gpus,
        n_ctx=n_ctx, gpu_layers=min(offloaded, n_layer), n_layer=n_layer,
        weights_all=model.tensor_bytes, kv_all=sum(kv_layers), compute_all=compute,
    )


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
    data = {"estimate": est.to_json(), "per_gpu": {str(i): b for i, b in shares.items()}}
    for gpu in gpus:
        others = {n: h[gpu.index] for n, h in held.items() if h.get(gpu.index)}
        used = max(gpu.vram_used or 0, sum(others.values()))
        room = max(totals[gpu.index] - used, 0)
        need = shares[gpu.index]
        if need <= room:
            continue
        holders = "; ".join(f"{n} holds {gib(b)}" for n, b in sorted(others.items()))
        text = (f"needs ~{gib(need)}" + (f" on GPU {gpu.index}" if len(gpus) > 1 else "")
                + f", GPU {gpu.index} has {gib(room)} free" + (f"; {holders}" if holders else ""))
        if force:
            return warn(name, text + " (force_vram = true: starting anyway)", None, **data)
        stop = f", stop {', '.join(sorted(others))}" if others else ""
        return fail(name, text, f"lower ctx_size (now {est.n_ctx}) or n_gpu_layers{stop}, or set "
                    "force_vram = true to start anyway", **data)
    where = ", ".join(f"GPU {i} ~{gib(b)}" for i, b in shares.items())
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
