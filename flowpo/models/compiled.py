"""Regional compilation (`engine.compile`): torch.compile on each repeated transformer block.

A diffusion transformer is a stack of identical blocks; compiling the block instead of the whole
model keeps compile time to one block's graph (the blocks share their code, so the others reuse
it), and leaves the code around the blocks (embeddings, CFG, the SDE step) eager.
`nn.Module.compile` compiles a module in place: parameter names, state dicts, peft's LoRA
switches and DeepSpeed's wrapping stay as they are.

The blocks are the modules named by diffusers' `_repeated_blocks` (FLUX, Qwen-Image), else the
entries of every `nn.ModuleList` of at least two modules of one class (SD3's
`transformer_blocks`, Bagel's MoT layers).

The first ratio stays exactly 1: the rollout (no grad) and the re-scoring (grad) call the same
compiled blocks, and the forward of inductor's training graph computes the same numbers as its
inference graph (checked by tests/test_compile.py through a whole epoch).
"""

from __future__ import annotations

from torch import nn


def repeated_blocks(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) of the transformer's repeated blocks, in module order."""
    names = set(getattr(module, "_repeated_blocks", None) or ())
    if names:
        return [(n, m) for n, m in module.named_modules() if type(m).__name__ in names]
    out = []
    for name, child in module.named_modules():
        if isinstance(child, nn.ModuleList) and len(child) >= 2:
            kinds = {type(m) for m in child}
            if len(kinds) == 1:
                out += [(f"{name}.{i}", m) for i, m in enumerate(child)]
    return out


def compile_repeated_blocks(module: nn.Module, **compile_kwargs) -> list[str]:
    """torch.compile each repeated block of `module` in place (the first call of each block
    compiles); returns the names of the compiled blocks. Raises when there are none."""
    blocks = repeated_blocks(module)
    if not blocks:
        raise ValueError(
            f"engine.compile: {type(module).__name__} has no repeated blocks to compile "
            "(no _repeated_blocks and no ModuleList of one block class); set engine.compile=false"
        )
    for _, block in blocks:
        block.compile(**compile_kwargs)
    return [name for name, _ in blocks]
