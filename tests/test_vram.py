"""mi50d.host.vram: the estimate on real GGUF files, the fit check on the recorded two-MI50 host, and
the buffer-size parser on recorded and real llama-server output."""

from __future__ import annotations

import json
import subprocess
import tracemalloc
from pathlib import Path

import pytest

from mi50d.config import HostPaths, InstanceConfig
from mi50d.host.ggufmeta import GGUFError, read_gguf
from mi50d.host.gpus import list_gpus
from mi50d.host.vram import (
    MAX_LAYERS,
    OVERHEAD_PER_GPU,
    Estimate,
    GiB,
    MiB,
    check_fit,
    estimate,
    estimate_error,
    parse_buffers,
    pool_bytes,
)
from tests.ggufwriter import write_model
from tests.realbinary import llama_server

HOSTS = Path(__file__).parent / "fixtures" / "hosts"
TWO_MI50 = HostPaths(sysfs_root=HOSTS / "two-mi50" / "sys")


def inst(model: Path, **keys: object) -> InstanceConfig:
    return InstanceConfig.model_validate(
        {"model": model, "port": 8080, "name": "m", "source": model.with_suffix(".toml"), **keys})


def test_full_offload_counts_everything_but_token_embd(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m.gguf", n_layer=2, n_embd=256, n_head=4, n_head_kv=2,
                       n_ctx_train=4096)
    model = read_gguf(path)
    est = estimate(inst(path), model)
    embd = next(t.nbytes for t in model.tensors if t.name == "token_embd.weight")
    assert est.weights == model.tensor_bytes - embd
    # n_ctx(trained 4096) * layers 2 * n_head_kv 2 * (64 + 64) * 2 bytes
    assert est.kv == 4096 * 2 * 2 * 128 * 2
    assert est.n_ctx == 4096 and est.gpu_layers == 2
    assert est.overhead == OVERHEAD_PER_GPU
    assert est.total == est.weights + est.kv + est.compute + est.overhead


def test_ctx_size_zero_means_trained_and_is_padded(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m.gguf", n_ctx_train=8192)
    model = read_gguf(path)
    assert estimate(inst(path, ctx_size=0), model).n_ctx == 8192
    assert estimate(inst(path, ctx_size=1000), model).n_ctx == 1024
    small, big = estimate(inst(path, ctx_size=1024), model), estimate(inst(path), model)
    assert big.kv == 8 * small.kv


def test_partial_offload_takes_the_output_layer_first(tmp_path: Path) -> None:
    # llama.cpp's -ngl N is the output layer and the last N - 1 blocks (measured on CUDA,
    # vram-third-shape.md §5; before vram v2 this test pinned "the last N blocks, no output")
    path = write_model(tmp_path / "m.gguf", n_layer=4)
    model = read_gguf(path)
    output = sum(t.nbytes for t in model.tensors if t.name.startswith("output"))
    blk3 = sum(t.nbytes for t in model.tensors if t.name.startswith("blk.3."))
    two = estimate(inst(path, n_gpu_layers=2), model)
    assert two.weights == blk3 + output and two.gpu_layers == 1
    assert two.kv == estimate(inst(path), model).kv // 4
    one = estimate(inst(path, n_gpu_layers=1), model)
    assert one.weights == output and one.kv == 0 and one.gpu_layers == 0
    assert estimate(inst(path, n_gpu_layers=0), model, n_gpus=1).weights == 0
    cpu = estimate(inst(path), model, n_gpus=0)
    assert cpu.total == 0 and cpu.weights_all == model.tensor_bytes


def test_tied_embeddings_put_a_copy_of_token_embd_on_the_gpu(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m.gguf", tied=True)
    model = read_gguf(path)
    assert estimate(inst(path), model).weights == model.tensor_bytes
    assert estimate(inst(path, n_gpu_layers=2), model).weights < model.tensor_bytes


def test_flash_attn_off_adds_the_kq_matrix(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m.gguf")  # n_embd 256, 4/2 heads of 64, n_ff 512, ctx 4096
    model = read_gguf(path)
    on, off = estimate(inst(path), model), estimate(inst(path, flash_attn="off"), model)
    # v2 (tests/test_vram_v2.py): with FA off the f32 KQ matrix and mask replace the FFN's peak
    assert on.compute == 4 * 512 * (4 * 256 + 3 * 512) + 2 * 512 * 4096
    assert off.compute == 4 * 512 * (256 + 4 * 4 * 64 + 2 * 2 * 64 + (4 + 1) * 4096)
    assert on.pool == 0 and off.pool == pool_bytes(4096, 4) > 0


def _estimate(total_gib: float) -> Estimate:
    work = int(total_gib * GiB) - OVERHEAD_PER_GPU
    return Estimate(weights=work, kv=0, compute=0, mmproj=0, overhead=OVERHEAD_PER_GPU,
                    n_ctx=131072, gpu_layers=24, n_layer=24, weights_all=work, kv_all=0,
                    compute_all=0)


def test_refuses_with_numbers_on_the_busy_16_gb_mi50() -> None:
    gpu0, gpu1 = list_gpus(TWO_MI50)
    # sysfs: 16368 MiB total, 13824 MiB used (the other instance, already running)
    held = {"gpt-oss-20b": {0: int(13.2 * GiB)}}
    check = check_fit(_estimate(18.3), [gpu0], held)
    assert check.status == "fail"
    assert check.message == ("needs ~18.3 GiB, GPU 0 has 2.5 GiB free; "
                             "gpt-oss-20b holds 13.2 GiB")
    assert check.fix is not None and "ctx_size (now 131072)" in check.fix
    assert "stop gpt-oss-20b" in check.fix
    forced = check_fit(_estimate(18.3), [gpu0], held, force=True)
    assert forced.status == "warn" and "force_vram" in forced.message
    assert check_fit(_estimate(18.3), [gpu1], {}).status == "ok"


def test_holdings_of_a_loading_instance_count_when_sysfs_does_not_show_them_yet() -> None:
    _, gpu1 = list_gpus(TWO_MI50)  # 32 GB, 1.1 GiB used
    assert check_fit(_estimate(20), [gpu1], {}).status == "ok"
    loading = {"qwen3-vl-32b": {1: 20 * GiB}}
    check = check_fit(_estimate(20), [gpu1], loading)
    assert check.status == "fail" and "qwen3-vl-32b holds 20.0 GiB" in check.message


def test_two_gpus_split_by_total_vram() -> None:
    gpus = list_gpus(TWO_MI50)
    shares = _estimate(24.0).split({g.index: g.vram_total or 0 for g in gpus})
    assert shares[1] > shares[0]
    assert sum(shares.values()) == pytest.approx(24 * GiB, abs=4)
    check = check_fit(_estimate(24.0), gpus, {})
    assert check.status == "fail" and "on GPU 0" in check.message  # GPU 0's third > 2.5 GiB


# Recorded from the format strings in llama.cpp (llama-model.cpp, llama-kv-cache.cpp,
# llama-context.cpp) as a ROCm build on one MI50 prints them, with the log prefix.
ROCM_LOG = """\
0.01.234.100 I load_tensors: offloading output layer to GPU
0.01.234.101 I load_tensors: offloaded 25/25 layers to GPU
0.01.234.102 I load_tensors:   CPU_Mapped model buffer size =   586.82 MiB
0.01.234.103 I load_tensors:        ROCm0 model buffer size = 11536.18 MiB
0.02.000.000 I llama_kv_cache:      ROCm0 KV buffer size =  3072.00 MiB
0.02.000.001 I llama_kv_cache: size = 3072.00 MiB (131072 cells,  12 layers,  4/1 seqs), \
K (f16): 1536.00 MiB, V (f16): 1536.00 MiB
0.02.000.002 I llama_context:  ROCm_Host  output buffer size =     0.77 MiB
0.02.000.003 I llama_context:      ROCm0 compute buffer size =   398.38 MiB
0.02.000.004 I llama_context:  ROCm_Host compute buffer size =   268.76 MiB
"""


def test_parse_recorded_rocm_buffers() -> None:
    m = parse_buffers(ROCM_LOG.splitlines())
    assert m.bytes("model") == round(586.82 * MiB) + round(11536.18 * MiB)
    assert m.bytes("KV") == 3072 * MiB
    assert m.bytes("compute") == round(398.38 * MiB) + round(268.76 * MiB)
    # ROCR_VISIBLE_DEVICES=1 makes the process's ROCm0 the host's GPU 1
    assert m.per_gpu(visible=(1,)) == {1: round((11536.18 + 3072 + 398.38) * MiB)}
    assert m.per_gpu() == {0: round((11536.18 + 3072 + 398.38) * MiB)}


def test_a_second_load_replaces_the_first() -> None:
    twice = ROCM_LOG + ROCM_LOG.replace("11536.18", "100.00")
    assert parse_buffers(twice.splitlines()).bytes("model") == round((586.82 + 100) * MiB)


# --- the real llama-server (CPU build) on the generated tiny model ------------------------------

def _vocab(binary: Path) -> Path:
    """llama.cpp's vocab-only GGUF from the source tree the build was made from."""
    record = json.loads((binary.parent.parent / "build.json").read_text())
    vocab = Path(record["source"]) / "models" / "ggml-vocab-llama-spm.gguf"
    if not vocab.is_file():
        pytest.skip(f"no {vocab}")
    return vocab


def _load_output(binary: Path, model: Path, ctx: int) -> list[str]:
    """llama-server's lines until it says the model is loaded. `-lv 4`: the buffer sizes are
    logged at the trace level, above llama-server's default verbosity (3)."""
    argv = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", "0",
            "--ctx-size", str(ctx), "--log-verbosity", "4"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            stdin=subprocess.DEVNULL)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if "model loaded" in line or "exiting due to" in line:
                break
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
    return lines


@pytest.mark.llama
@pytest.mark.parametrize("ctx", [1024, 8192])
def test_estimate_against_the_real_cpu_llama_server(tmp_path: Path, ctx: int) -> None:
    tinymodel = pytest.importorskip("mi50d.llama.tinymodel")
    binary = llama_server()
    model = tinymodel.write(tmp_path / "tiny.gguf", _vocab(binary))
    lines = _load_output(binary, model, ctx)
    measured = parse_buffers(lines)
    assert measured.bytes("model") > 0, lines[-5:]
    assert measured.bytes("KV") > 0 and measured.bytes("compute") > 0
    est = estimate(inst(model, ctx_size=ctx), read_gguf(model), n_gpus=0)
    errors = estimate_error(est, measured)
    # the measured error is a result of this test, shown with `pytest -s`
    report = (f"ctx {ctx}: measured model {measured.bytes('model') / MiB:.2f} MiB, "
              f"KV {measured.bytes('KV') / MiB:.2f} MiB, "
              f"compute {measured.bytes('compute') / MiB:.2f} MiB; estimate error: "
              + ", ".join(f"{k} {v:+.1%}" for k, v in errors.items()))
    print("\n" + report)  # noqa: T201
    # the KV formula is exact for llama; the others are printed, not asserted
    assert est.kv_all == measured.bytes("KV")


def test_a_block_count_llama_cpp_refuses_is_an_error_not_memory(tmp_path: Path) -> None:
    path = write_model(tmp_path / "m.gguf", block_count=1 << 40)
    model = read_gguf(path)
    tracemalloc.start()
    try:
        with pytest.raises(GGUFError, match=r"block_count = 1099511627776, but llama.cpp "
                                            r"allows 0 to 512 layers"):
            estimate(inst(path), model)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20
    at_limit = estimate(inst(tmp_path / "m.gguf"), read_gguf(
        write_model(tmp_path / "ok.gguf", block_count=MAX_LAYERS)))
    assert at_limit.n_layer == MAX_LAYERS


def test_per_layer_head_counts_of_a_deep_model_are_counted(tmp_path: Path) -> None:
    # 80 layers: longer than the 64 items kept of a string array, still kept as numbers
    deep = read_gguf(write_model(tmp_path / "deep.gguf", n_layer=80, per_layer_kv=True))
    flat = read_gguf(write_model(tmp_path / "flat.gguf", n_layer=80))
    assert estimate(inst(deep.path), deep).kv == estimate(inst(flat.path), flat).kv > 0
