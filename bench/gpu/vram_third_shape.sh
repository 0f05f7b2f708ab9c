#!/usr/bin/env bash
# On the lent GPU machine (device tool), from the repository root, with .gpu/ carried:
#   .gpu/llama.tar.gz   mi50d's cached llama.cpp source without models/ docs/ media/ benches/ .github/
#                       .devops/ tools/ui/src tools/ui/tests .git (as in ../shared/research/gpu-vram-cuda.md)
#   .gpu/ggml-vocab-{llama-spm,qwen2}.gguf   the two vocab files from its models/
#   .gpu/{genmodel,measure,vram_third_shape}.sh|py   copies of bench/gpu/*
# Builds llama-server for CUDA (sm_90) with the research doc's flags, writes the models, runs every
# configuration in measure.py, and leaves results.tar.gz + runs.csv under $OUT. Idempotent: a second
# call on the same (still warm) machine reuses the build and the models and runs what is left.
# PHASE=2 MODELS="l3b q32" runs measure.py's second list (partial offload) into results2/.
# PHASE=3 MODELS="q3 q32" EXTRA_CMAKE=-DGGML_CUDA_NO_VMM=ON: the legacy pool (HIP's default), results3/.
set -u
START=$(date +%s)
DEADLINE=$((START + ${BUDGET_S:-560}))
W=/tmp/vram3
G=$PWD/.gpu
R=results${PHASE:+$PHASE}
mkdir -p $W/$R
pack() {
  cp $W/$R/runs.csv "$OUT/" 2>/dev/null
  (cd $W && tar czf "$OUT/results.tar.gz" $R models/*.header models/*.json build.log configure.log versions.txt)
  ls -la "$OUT"
}
trap pack EXIT
{
  date -u; uname -r; nproc
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nvcc --version | tail -2; gcc --version | head -1; cmake --version | head -1; echo "ninja $(ninja --version)"
  python3 --version; python3 -c 'import numpy; print("numpy", numpy.__version__)'
} > $W/versions.txt 2>&1
cat $W/versions.txt
if [ ! -d $W/llama.cpp ]; then tar xzf $G/llama.tar.gz -C $W; fi
BPID=
if [ ! -x $W/build/bin/llama-server ]; then
  (
    t0=$(date +%s%N)
    cmake -S $W/llama.cpp -B $W/build -G Ninja -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
      -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
      -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF -DCMAKE_BUILD_RPATH_USE_ORIGIN=ON ${EXTRA_CMAKE:-} > $W/configure.log 2>&1
    t1=$(date +%s%N)
    cmake --build $W/build --target llama-server -j16 > $W/build.log 2>&1
    rc=$?
    echo "rc=$rc configure $(( (t1 - t0) / 1000000 )) ms build $(( ($(date +%s%N) - t1) / 1000000 )) ms" >> $W/build.log
  ) &
  BPID=$!
fi
PYTHONPATH=$W/llama.cpp/gguf-py python3 $G/genmodel.py $W/models $G ${MODELS:-} 2>&1 | tee $W/$R/genmodel.log
df -h /tmp | tail -1
if [ -n "$BPID" ]; then wait $BPID; fi
tail -3 $W/build.log
$W/build/bin/llama-server --version 2>&1 | tee -a $W/versions.txt
grep -i "NO_VMM" $W/build/CMakeCache.txt | tee -a $W/versions.txt
PYTHONUNBUFFERED=1 python3 $G/measure.py $W/build/bin/llama-server $W/models $W/$R $DEADLINE
echo "total $(( $(date +%s) - START )) s"
