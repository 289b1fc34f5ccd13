#!/usr/bin/env python3
"""Make an oracle venv for one vLLM release as an overlay on a base venv (CPU host, no GPU).

    make_venv.py X [--base /work/venvs/vllm-0.34.0] [--venvs /work/venvs]

Creates VENVS/vllm-X whose site-packages holds only vLLM X's wheel (--no-deps) and the few
pinned requirements the base does not satisfy; a ``.pth`` file puts the base's site-packages
behind it (the technique the SGLang 0.5.11 expectations used). torch / torchvision / torchaudio
always come from the base (torch 2.14.1, the newest on this machine), as do the GPU-kernel
packages the base leaves out (flashinfer, tilelang, cutlass-dsl, ...: see reqs.txt). Then it
builds VENVS/stub-X/libcuda.so.1 (make_stub_libcuda.sh).

Why one torch for every release: from 0.24.0 on, vLLM's only import-time extension is
``vllm._C_stable_libtorch``, built against libtorch's stable ABI, which loads under a newer
torch; nothing the oracle records (parameters, name mapping, loader outcomes) is computed by a
kernel. Releases before 0.24.0 import ``vllm._C`` (full, version-locked ABI): see
vllm_oracle.py's ``--shim-vllm-C`` and EPOCHS.md.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
FROM_BASE = {"torch", "torchvision", "torchaudio", "flashinfer-python", "flashinfer-cubin",
             "flashinfer-jit-cache", "xformers", "triton", "tilelang", "nvidia-cutlass-dsl",
             "quack-kernels", "humming-kernels", "tokenspeed-mla", "pynvvideocodec", "torchcodec",
             "nvidia-cudnn-frontend", "nvtx", "fastsafetensors", "instanttensor", "deep-gemm",
             "flash-attn", "cupy-cuda12x", "ray", "numba", "llvmlite", "nixl", "nvidia-ml-py"}


def norm(n):
    return re.sub(r"[-_.]+", "-", n).lower()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("version")
    ap.add_argument("--base", default="/work/venvs/vllm-0.34.0")
    ap.add_argument("--venvs", default="/work/venvs")
    ap.add_argument("--dl", default="/work/dl")
    ap.add_argument("--torch-layer", default=None,
                    help="venv(s), comma-separated, holding only the release's pinned torch/torchvision (pip install --no-deps) "
                         "and, for CUDA 12 builds, the nvidia-*-cu12 libraries; "
                         "its site-packages goes before the base's (releases before 0.24.0 import vllm._C, "
                         "whose ABI is locked to one torch)")
    a = ap.parse_args()
    v = a.version
    venv = os.path.join(a.venvs, f"vllm-{v}")
    base_py = os.path.join(a.base, "bin", "python")
    base_sp = subprocess.check_output([base_py, "-c", "import sysconfig;print(sysconfig.get_paths()['purelib'])"],
                                      text=True).strip()
    if not os.path.exists(venv):
        subprocess.check_call([sys.executable, "-m", "venv", venv])
    py = os.path.join(venv, "bin", "python")
    sp = subprocess.check_output([py, "-c", "import sysconfig;print(sysconfig.get_paths()['purelib'])"],
                                 text=True).strip()
    layers = []
    for layer in (a.torch_layer or "").split(","):  # e.g. torch-2.10,cu12 (CUDA 12 libraries)
        if layer:
            layers.append(subprocess.check_output(
                [os.path.join(layer, "bin", "python"), "-c",
                 "import sysconfig;print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    with open(os.path.join(sp, "zz_oracle_base.pth"), "w") as f:
        f.write("".join(p + "\n" for p in layers) + base_sp + "\n")
    dl = os.path.join(a.dl, v)
    whl = glob.glob(os.path.join(dl, f"vllm-{v}-*x86_64.whl"))
    if not whl:
        subprocess.check_call([py, "-m", "pip", "download", "-q", "--no-deps", f"vllm=={v}", "-d", dl])
        whl = glob.glob(os.path.join(dl, f"vllm-{v}-*x86_64.whl"))
    subprocess.check_call([py, "-m", "pip", "install", "-q", "--no-deps", whl[0]])
    with zipfile.ZipFile(whl[0]) as z:
        meta = z.read([n for n in z.namelist() if n.endswith(".dist-info/METADATA")][0]).decode()
    reqs = [l.split(":", 1)[1].strip() for l in meta.splitlines() if l.startswith("Requires-Dist:")]
    check = r"""
import sys, importlib.metadata as md
from packaging.requirements import Requirement
bad = []
for line in sys.stdin.read().splitlines():
    r = Requirement(line)
    if r.marker is not None and not r.marker.evaluate({"extra": ""}):
        continue
    try:
        have = md.version(r.name)
    except md.PackageNotFoundError:
        have = None
    if have is None or (r.specifier and not r.specifier.contains(have, prereleases=True)):
        bad.append(f"{r.name}{r.specifier}|{have}")
print("\n".join(bad))
"""
    out = subprocess.run([py, "-c", check], input="\n".join(reqs), capture_output=True, text=True, check=True).stdout
    todo = []
    for l in out.splitlines():
        spec, have = l.split("|")
        name = re.split(r"[<>=!~ ]", spec)[0]
        if norm(name) in FROM_BASE:
            print(f"  from base (not installed): {spec} (base has {have})")
            continue
        todo.append(spec)
    if todo:
        print("  installing:", todo)
        # with their own dependencies (an older transformers needs an older huggingface-hub, ...);
        # pip sees the base's packages through the .pth and leaves those that already fit
        subprocess.check_call([py, "-m", "pip", "install", "-q", *todo])
    subprocess.check_call(["bash", os.path.join(HERE, "make_stub_libcuda.sh"), venv, os.path.join(a.venvs, f"stub-{v}")])


if __name__ == "__main__":
    main()
