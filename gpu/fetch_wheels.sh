#!/usr/bin/env bash
# Prepare .whl/ (ignored by git) with what a GPU machine without internet needs beyond its own CUDA torch and
# transformers 5.x: bitsandbytes (only its CPU and CUDA 13 kernels, to stay small), peft, trl, and for the
# transformers 4.57 comparison transformers 4.57.6 with the tokenizers / huggingface_hub it needs.
# Run on a connected machine in the repo root; then carry .whl to the GPU machine (gpu/run.sh installs it).
# TF5=5.25.0 also puts wheels of that transformers into .whl/tf5 (gpu/run.sh installs them ahead of the image's own)
# with what it needs beyond the image: huggingface-hub 2.x (5.25 needs >= 2.4, with httpx2), kernels (a base
# dependency since 5.25) and tokenizers 0.23. Set PEFT / TRL for their versions (e.g. PEFT=0.22.0). Carry only the
# folders a run needs (.whl/site, .whl/extra, .whl/tf5 for the cases: ~36 MB of the 64 MiB a device call takes).
set -euo pipefail
PY=${PY:-3.12}
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$1" "${@:2}"; }
rm -rf .whl && mkdir -p .whl/site .whl/tf457 .whl/extra .whl/tmp
dl .whl/tmp "bitsandbytes==${BNB:-0.50.2}" "peft==${PEFT:-0.21.2}"
if [ -n "${TF5:-}" ]; then
  mkdir -p .whl/tf5
  dl .whl/tf5 "transformers==$TF5" "huggingface_hub==${HUB:-2.5.0}" "kernels==${KERNELS:-0.19.1}" \
    "tokenizers==${TOKENIZERS:-0.23.3}" httpx2 httpcore2 truststore "click>=8.4.2" tomlkit hf-xet "accelerate==1.16.0"
fi
(cd .whl/site && for w in ../tmp/*.whl; do unzip -qo "$w"; done \
  && rm -f bitsandbytes/libbitsandbytes_cuda1[12]*.so bitsandbytes/libbitsandbytes_cuda132.so \
           bitsandbytes/libbitsandbytes_rocm*.so bitsandbytes/libbitsandbytes_xpu*.so)
# peft 0.18.1 beside transformers 4.57 (peft 0.21 fails on 4.57 per-expert Linear4bit targets)
dl .whl/tf457 transformers==4.57.6 tokenizers==0.22.1 huggingface_hub==0.36.0 peft==0.18.1
# trl and datasets for SFTTrainer (the GPU image has pyarrow, pandas, fsspec, httpx already)
dl .whl/extra "trl==${TRL:-1.16.0}" datasets==5.0.1 dill multiprocess xxhash
# peers for the full-depth benchmark (gpu/run.sh depth): experts4bit-qlora (needs torch + bitsandbytes only) and
# unsloth with the small pure-python packages it imports; unsloth's wheel also carries its web "studio" (86 MB
# unpacked), which training never imports: it is left out so everything fits the 64 MiB a device call may carry.
mkdir -p .whl/peers
dl .whl/peers experts4bit-qlora==0.58.1 grouped-nf4-gemm==0.51.0 unsloth_zoo==2026.10.9 tyro docstring_parser typeguard shtab \
  cut_cross_entropy msgspec torchao
dl .whl/tmp unsloth==2026.10.9
(mkdir -p .whl/tmp/us && cd .whl/tmp/us && unzip -q ../unsloth-*.whl && rm -rf studio && zip -qr ../../peers/unsloth-nostudio.zip .)
rm -rf .whl/tmp
du -sh .whl
