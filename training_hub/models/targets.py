"""Which modules LoRA adapts."""

from __future__ import annotations

LINEAR_CLASS_NAMES = {"Linear", "Linear4bit", "Linear8bitLt"}
BLOCK_LISTS = ("layers", "h", "blocks")  # module-path components holding a model's list of blocks


def linear_projection_names(model) -> list[str]:
    """Names (last path component) of every linear projection inside the decoder blocks.

    The LM head and embeddings are excluded: adapting them is rarely wanted and vLLM does not serve
    LoRA on them. Works for any architecture whose blocks sit under a `.layers.` / `.h.` / `.blocks.` list.
    """
    names = set()
    for path, module in model.named_modules():
        parts = path.split(".")
        if type(module).__name__ in LINEAR_CLASS_NAMES and any(p in BLOCK_LISTS for p in parts[:-1]):
            names.add(parts[-1])
    if not names:
        raise ValueError(
            f"Found no linear projections inside the decoder blocks of {type(model).__name__}; "
            "pass target_modules explicitly (e.g. ['q_proj', 'v_proj'])"
        )
    return sorted(names)


def check_targets_exist(model, target_modules: list[str]) -> None:
    """Fail clearly when a requested target module does not exist in the model."""
    present = {path.split(".")[-1] for path, _ in model.named_modules()}
    missing = [t for t in target_modules if t not in present]
    if missing:
        available = linear_projection_names(model)
        raise ValueError(f"target_modules {missing} do not exist in {type(model).__name__}; "
                         f"its decoder projections are {available}")
