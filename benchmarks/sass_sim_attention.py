"""Static cost of the fused sigmoid / elu+1 kernels (lit_gpt/kernels/sim_attention.py) without a GPU: each variant
compiled ahead of time for sm_90 (H100 / H200) with the bf16 tile configs the kernel launches, then registers and
spill stack from cuobjdump and the SASS of the two key / query-block loops from nvdisasm (both ship with Triton).

The loops are found as backward branches; per kernel the two largest are the block loops: the elementwise-masked
one (edge blocks) and the fully allowed one ("hot": for causal attention at T >> block size nearly every block).
Instruction counts of a loop body are what a warp issues per block; fewer at the same tensor-core work means less
time wherever the loop is issue-bound (the forward of these kernels is: no warp specialisation overlaps the
elementwise work with the matmuls). A guide, not a timing: bench_sim_attention.py measures.

    python benchmarks/sass_sim_attention.py --out benchmarks/results/sim_attention_sass.json
    PYTHONPATH=/path/to/triton-3.6 python benchmarks/sass_sim_attention.py ...   # the GPU box's Triton
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"        # compile, not interpret (sim_attention picks the interpreter without CUDA)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from common import print_table, write_json  # noqa: E402
from lit_gpt.kernels import sim_attention as sim  # noqa: E402

VARIANTS = {   # name: (OP index, NORMALIZE, ALIBI)
    "sigmoid Z=1": (0, False, False),
    "sigmoid normalised": (0, True, False),
    "elu+1 Z=1": (1, False, False),
    "elu+1 normalised": (1, True, False),
    "elu+1 normalised, ALiBi": (1, True, True),
}
POINTERS_FP32 = ("Z", "RZ", "DL", "SLOPES")
INTS = ("H", "GROUP", "T", "W", "NS", "P")
OPCODES = ("HGMMA", "MUFU", "FMUL", "FFMA", "FADD", "FMNMX", "FSEL", "FSETP", "STL", "LDL")


def _bin(tool: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def compile_kernel(name: str, op: int, normalize: bool, alibi: bool, head_size: int, arch: int) -> bytes:
    fn = sim._KERNELS[name]
    bm, bn, warps, stages = sim._CONFIGS["bf16"][name]
    meta = dict(OP=op, NORMALIZE=normalize, ALIBI=alibi, D=head_size, DP=max(16, triton.next_power_of_2(head_size)),
                FAST=True, PREC="tf32", BM=bm, BN=bn)
    if name == "fwd":
        meta["N_SLOTS"] = 0
    sig = {}
    for a in fn.arg_names:
        if a in meta:
            sig[a] = "constexpr"
        elif a == "scale":
            sig[a] = "fp32"
        elif a in INTS or a.islower():
            sig[a] = "i32"                       # sizes and strides
        else:
            sig[a] = "*fp32" if a in POINTERS_FP32 else "*bf16"
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in meta.items()})
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=warps, num_stages=stages)).asm["cubin"]


def analyse(cubin: bytes) -> dict:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([_bin("cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                             check=True).stdout
        sass = subprocess.run([_bin("nvdisasm"), "-c", path], capture_output=True, text=True, check=True).stdout
    labels, body, loops = {}, [], []
    for line in sass.splitlines():
        lab = re.match(r"\s*(\.L_x_\d+):", line)
        if lab:
            labels[lab.group(1)] = len(body)
            continue
        ins = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if not ins:
            continue
        body.append(ins.group(1))
        br = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", line)
        if br and labels.get(br.group(1), len(body)) < len(body):
            loops.append(body[labels[br.group(1)]:])
    loops = sorted(loops, key=len, reverse=True)[:2]
    if len(loops) < 2:
        raise RuntimeError(f"expected two block loops in the SASS, found {len(loops)}")
    edge, hot = loops
    counts = collections.Counter(hot)
    return {"registers": int(re.search(r"REG:(\d+)", res).group(1)),
            "spill_stack_bytes": int(re.search(r"STACK:(\d+)", res).group(1)),
            "hot_loop_instructions": len(hot), "edge_loop_instructions": len(edge),
            **{f"hot_{o}": counts[o] for o in OPCODES}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/sim_attention_sass.json")
    ap.add_argument("--head-size", type=int, default=96)
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100 / H200")
    ap.add_argument("--note", default="", help="kept in the JSON (e.g. which kernel source this was)")
    a = ap.parse_args()
    rows = []
    for variant, (op, normalize, alibi) in VARIANTS.items():
        for name in ("fwd", "dkdv", "dq"):
            rows.append({"variant": variant, "kernel": name, "tiles": sim._CONFIGS["bf16"][name],
                         **analyse(compile_kernel(name, op, normalize, alibi, a.head_size, a.arch))})
            print(rows[-1], flush=True)
    print_table(rows, ["variant", "kernel", "registers", "spill_stack_bytes", "hot_loop_instructions",
                       "edge_loop_instructions", "hot_MUFU", "hot_HGMMA"])
    write_json(a.out, rows, {"triton": triton.__version__, "arch": f"sm_{a.arch}", "head_size": a.head_size,
                             "compiled_without_gpu": True,
                             "kernel_source": os.path.relpath(sim.__file__), "note": a.note})


if __name__ == "__main__":
    main()
