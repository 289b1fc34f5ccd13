#!/usr/bin/env python3
"""Compare the loading-path code of vLLM releases, definition by definition (EPOCHS.md, "Method").

    compare_code.py SRC_A SRC_B [--diff] [--tp]

SRC_* is a directory holding a release's ``vllm/`` tree (``unzip -q WHEEL 'vllm/*.py' -d SRC``; the
wheel itself can be deleted afterwards). For every file of the loading path (``FILES``) every top-level
function, class, method and class-level assignment is hashed (``ast.dump`` without positions, so
comments, blank lines and line numbers do not count; the last definition of a repeated name wins, as at
run time). Prints the definitions that were added, removed or changed from A to B (with ``--diff``, a
unified diff of each changed definition's source), and ``IDENTICAL`` when there is none. Two releases
are in one behaviour row only when this prints ``IDENTICAL`` or every change it lists was read and
shown to be a no-op for Nemotron-H loading (recorded in EPOCHS.md).

``--tp`` compares ``TP_FILES`` instead: the code that decides tensor-parallel rank maps (layer sizes, weight
loaders, process groups). A patch release answers with a run release's maps (``TP_SAME_AS`` in
``nhcheck/engines/vllm.py``) only when this prints ``IDENTICAL`` or every change is read as making no parameter
or loader.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import hashlib
import os
import sys

#: The loading path: the model, its wrapper and MTP head, the loaders, the quant configs, the layers
#: whose parameters or weight loaders the manifest and the replay depend on, the config classes.
FILES = (
    "model_executor/models/nemotron_h.py",
    "model_executor/models/nemotron_h_mtp.py",
    "model_executor/models/nano_nemotron_vl.py",
    "model_executor/models/utils.py",
    "model_executor/models/registry.py",
    "model_executor/model_loader/weight_utils.py",
    "model_executor/model_loader/default_loader.py",
    "model_executor/model_loader/utils.py",
    "model_executor/model_loader/base_loader.py",
    "model_executor/layers/quantization/modelopt.py",
    "model_executor/layers/quantization/base_config.py",
    "model_executor/layers/quantization/__init__.py",
    "model_executor/layers/quantization/kv_cache.py",
    "model_executor/layers/linear.py",
    "model_executor/layers/layernorm.py",
    "model_executor/layers/mamba/mamba_mixer2.py",
    "model_executor/layers/fused_moe/layer.py",
    "model_executor/layers/fused_moe/routed_experts.py",
    "model_executor/layers/fused_moe/shared_fused_moe.py",
    "model_executor/layers/vocab_parallel_embedding.py",
    "model_executor/parameter.py",
    "transformers_utils/configs/nemotron_h.py",
    "transformers_utils/config.py",
    "transformers_utils/model_arch_config_convertor.py",
    "config/model.py",
    "config/__init__.py",
)

#: The tensor-parallel path (``--tp``): what sizes each rank's parameters and cuts the checkpoint tensors into them.
TP_FILES = (
    "model_executor/layers/linear.py",
    "model_executor/parameter.py",
    "model_executor/layers/mamba/mamba_mixer2.py",
    "model_executor/layers/mamba/mamba_utils.py",
    "model_executor/layers/mamba/ops/layernorm_gated.py",
    "model_executor/models/nemotron_h.py",
    "model_executor/models/utils.py",
    "model_executor/layers/fused_moe/layer.py",
    "model_executor/layers/fused_moe/routed_experts.py",
    "model_executor/layers/fused_moe/config.py",
    "model_executor/layers/fused_moe/expert_map_manager.py",
    "model_executor/layers/fused_moe/shared_fused_moe.py",
    "model_executor/layers/fused_moe/unquantized_fused_moe_method.py",
    "model_executor/layers/fused_moe/oracle/nvfp4.py",
    "model_executor/layers/quantization/modelopt.py",
    "model_executor/layers/quantization/fp8.py",
    "model_executor/layers/quantization/kv_cache.py",
    "model_executor/layers/vocab_parallel_embedding.py",
    "model_executor/layers/layernorm.py",
    "model_executor/layers/utils.py",
    "config/model.py",
    "config/parallel.py",
    "distributed/utils.py",
    "distributed/parallel_state.py",
    "model_executor/model_loader/weight_utils.py",
    "model_executor/model_loader/utils.py",
    "model_executor/model_loader/default_loader.py",
)


def definitions(path: str) -> dict[str, tuple[str, str]]:
    """qualified name → (hash, source) of every top-level definition and method in one file."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    tree = ast.parse(text)
    out: dict[str, tuple[str, str]] = {}

    lines = text.splitlines(True)

    def add(name: str, node: ast.AST, where: ast.AST | None = None, end: int | None = None) -> None:
        dump = ast.dump(node, include_attributes=False)
        where = where or node
        decorators = getattr(where, "decorator_list", None) or []
        first = min([where.lineno] + [d.lineno for d in decorators])  # type: ignore[attr-defined]
        source = "".join(lines[first - 1 : end or where.end_lineno])  # type: ignore[attr-defined]
        out[name] = (hashlib.sha256(dump.encode()).hexdigest()[:16], source)

    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            add(node.name, node)
        elif isinstance(node, ast.ClassDef):
            header = ast.ClassDef(
                name=node.name, bases=node.bases, keywords=node.keywords, decorator_list=node.decorator_list,
                body=[b for b in node.body if not isinstance(b, (ast.FunctionDef, ast.AsyncFunctionDef))],
                type_params=[],
            )  # fmt: skip
            methods = [b.lineno for b in node.body if isinstance(b, (ast.FunctionDef, ast.AsyncFunctionDef))]
            add(node.name, header, node, (min(methods) - 1) if methods else None)
            for b in node.body:
                if isinstance(b, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    add(f"{node.name}.{b.name}", b)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name):
                    add(t.id, node)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        else:
            add(f"<top {type(node).__name__} @{getattr(node, 'lineno', '?')}>", node)
    return out


def release_defs(src: str, files: tuple[str, ...] = FILES) -> dict[str, dict[str, tuple[str, str]]]:
    root = os.path.join(src, "vllm") if os.path.isdir(os.path.join(src, "vllm")) else src
    return {f: definitions(os.path.join(root, f)) for f in files if os.path.isfile(os.path.join(root, f))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--diff", action="store_true", help="print a unified diff of every changed definition")
    ap.add_argument("--tp", action="store_true", help="compare the tensor-parallel path (TP_FILES)")
    args = ap.parse_args(argv)
    files = TP_FILES if args.tp else FILES
    a, b = release_defs(args.a, files), release_defs(args.b, files)
    changes = 0
    for f in files:
        if f not in a and f not in b:
            continue
        if f not in a or f not in b:
            print(f"{f}: {'added' if f in b else 'removed'} (file)")
            changes += 1
            continue
        da, db = a[f], b[f]
        for name in sorted(set(da) | set(db)):
            if name not in db:
                print(f"{f}: - {name}")
            elif name not in da:
                print(f"{f}: + {name}")
            elif da[name][0] != db[name][0]:
                print(f"{f}: ~ {name}")
                if args.diff:
                    sys.stdout.writelines(
                        difflib.unified_diff(
                            da[name][1].splitlines(True), db[name][1].splitlines(True), args.a, args.b, n=2
                        )
                    )
                    print()
            else:
                continue
            changes += 1
    print("IDENTICAL" if not changes else f"{changes} definitions differ")
    return 0 if not changes else 1


if __name__ == "__main__":
    sys.exit(main())
