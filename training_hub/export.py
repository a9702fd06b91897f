"""Merged export: fold a LoRA adapter into its base model (W + scale * B @ A) and save 16-bit safetensors.

Merging uses plain transformers + PEFT, never Unsloth: when Unsloth is loaded in this process (it patches
transformers and PEFT), `merge_adapter_isolated` runs the merge in a fresh Python process.
The base is loaded unquantized from `base_model_path`: a QLoRA adapter is merged into the 16-bit weights its
4-bit base was quantized from, never into 4-bit weights (PEFT's Linear4bit.merge would re-quantize). A base
that is itself stored quantized (e.g. a bnb-4bit checkpoint) is dequantized first.

    python -m training_hub.export BASE ADAPTER OUTPUT [--dtype bfloat16] [--overwrite]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal

from .outputs import MERGED_DIR  # the one folder inside an adapter folder a merge may write to (save_merged's)

MergeDtype = Literal["bfloat16", "float16", "float32"]
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def vllm_warnings(adapter_config: dict[str, Any]) -> list[str]:
    """Why vLLM would not serve this adapter as a LoRA (it would need the merged model instead)."""
    out = []
    if adapter_config.get("use_dora"):
        out.append("DoRA adapters are not served as LoRA by vLLM; serve the merged model (save_merged=True or "
                   "training_hub.merge_adapter)")
    if adapter_config.get("modules_to_save"):
        out.append(f"modules_to_save={adapter_config['modules_to_save']} are full weights that vLLM does not load "
                   "from a LoRA adapter; serve the merged model")
    return out


def _output_problem(out: Path, overwrite: bool) -> str | None:
    if out.exists() and not out.is_dir():
        return f"output_dir={str(out)!r} exists and is not a folder"
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        return f"output_dir={str(out)!r} is not empty: choose a new folder or pass overwrite=True"
    return None


def _overlap_problems(out: Path, adapter_path: str | Path, base_model_path: str) -> list[str]:
    """The output may be neither an input folder, nor inside one (except the adapter's own `merged` folder), nor hold
    one (replacing it would delete the input)."""
    target = out.expanduser().resolve()
    problems = []
    for name, path in (("adapter_path", adapter_path), ("base_model_path", base_model_path)):
        folder = Path(path).expanduser()
        if not folder.is_dir():
            continue  # a hub id
        source = folder.resolve()
        own_merged = name == "adapter_path" and target == source / MERGED_DIR
        if target == source or (source in target.parents and not own_merged):
            problems.append(f"output_dir={str(out)!r} is inside {name}={str(path)!r}: writing the merged model there "
                            "would mix it with (or replace) what it is made from; choose a folder outside it")
        elif target in source.parents:
            problems.append(f"output_dir={str(out)!r} holds {name}={str(path)!r}: replacing it would delete that input; "
                            "choose another folder")
    return problems


def _base_problems(base_model_path: str, adapter_path: str | Path, adapter: dict[str, Any], allow_other_base: bool,
                   trust_remote_code: bool) -> list[str]:
    """The base must be readable, have the shapes the adapter was trained for, and be the adapter's own base
    (another model of the same shapes would merge without an error into a wrong model) unless allowed."""
    from transformers import AutoConfig

    from .preflight import adapter_shape_problems, meta_model, model_file_problems, same_base

    problems = model_file_problems(base_model_path)
    meta = meta_model(AutoConfig.from_pretrained(base_model_path, trust_remote_code=trust_remote_code), trust_remote_code)
    if meta is not None:
        problems += [p.replace("lora_adapter=", "adapter_path=").replace("give that base as model_path",
                                                                          "give that base as base_model_path")
                     for p in adapter_shape_problems(Path(adapter_path), meta)]
    recorded = adapter.get("base_model_name_or_path")
    if not allow_other_base and not same_base(recorded, base_model_path):
        problems.append(f"adapter_path={str(adapter_path)!r} was trained on {recorded!r}, not on "
                        f"base_model_path={base_model_path!r}; merge into its own base, or pass allow_other_base=True "
                        "if that model is a copy of it")
    return problems


def merge_adapter(base_model_path: str, adapter_path: str | Path, output_dir: str | Path, *,
                  dtype: MergeDtype = "bfloat16", overwrite: bool = False, trust_remote_code: bool = False,
                  allow_other_base: bool = False) -> Path:
    """Write base + LoRA adapter as one model: safetensors, config and tokenizer in `output_dir`.

    Reads only `base_model_path` and the adapter folder (safe to run again). The model is written to a
    temporary folder next to `output_dir` and renamed into place, so `output_dir` never holds half a model.
    The result loads with `AutoModelForCausalLM.from_pretrained(output_dir)` (a vision-language model with
    `AutoModelForImageTextToText`, its processor saved beside it) and serves in vLLM.

    Args:
        base_model_path: the base model the adapter was trained on (folder or hub id).
        adapter_path: a PEFT LoRA adapter folder (a lora_sft output folder or one of its checkpoint-N folders).
        output_dir: where the merged model goes; must be empty or absent unless overwrite=True, and outside the
            adapter and base folders (the adapter folder's own `merged` sub-folder is allowed).
        dtype: "bfloat16" (default), "float16" or "float32" weights.
        allow_other_base: merge although the adapter records another base model (`base_model_name_or_path`),
            e.g. a renamed copy of it; the shapes must fit all the same.
    Returns:
        The output folder.
    Raises:
        FileExistsError: `output_dir` is not empty (without overwrite=True).
        ConfigError: `output_dir` is inside (or holds) the adapter or base folder; the base is damaged, has other
            shapes than the adapter, or is not the adapter's own base; the adapter is a lora_sft output whose final
            save did not complete. Nothing is written.
    """
    from .config import ConfigError
    from .models.adapters import read_adapter_config
    from .models.vision import detect
    from .outputs import final_adapter_problem

    out = Path(output_dir)
    problem = _output_problem(out, overwrite)
    if problem:
        raise FileExistsError(problem)
    adapter = read_adapter_config(adapter_path, "adapter_path")  # a LoRA adapter with safetensors weights
    overlaps = _overlap_problems(out, adapter_path, base_model_path)
    if overlaps:
        raise ConfigError(overlaps)
    problems = _base_problems(base_model_path, adapter_path, adapter, allow_other_base, trust_remote_code)
    unfinished = final_adapter_problem(Path(adapter_path))
    if unfinished:
        problems.append(unfinished)
    if problems:
        raise ConfigError(problems)
    vision = detect(base_model_path, trust_remote_code)
    merged = _merged_model(base_model_path, str(adapter_path), dtype, vision, trust_remote_code)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    _tokenizer_for(adapter_path, base_model_path, vision, trust_remote_code).save_pretrained(tmp)
    _replace_folder(tmp, out)
    return out


def _merged_model(base_model_path: str, adapter_path: str, dtype: str, vision: bool, trust_remote_code: bool):
    from peft import PeftModel

    from .models.common import torch_dtype as to_torch_dtype
    from .models.vision import auto_model_class

    torch_dtype = to_torch_dtype(dtype)
    base = auto_model_class(vision).from_pretrained(base_model_path, dtype=torch_dtype, device_map={"": "cpu"},
                                                    trust_remote_code=trust_remote_code)
    if getattr(base, "hf_quantizer", None) is not None:  # a checkpoint stored quantized: merge into 16-bit
        base = base.dequantize().to(torch_dtype)
    model = PeftModel.from_pretrained(base, adapter_path)
    merged = model.merge_and_unload(safe_merge=True)  # safe_merge: refuse weights that became non-finite
    return merged


def _tokenizer_for(adapter_path: str | Path, base_model_path: str, vision: bool, trust_remote_code: bool):
    """The tokenizer (a vision-language model's processor) saved with the adapter (it may carry the chat template
    used in training), else the base's."""
    from .models.vision import load_processing_class

    source = adapter_path if any((Path(adapter_path) / f).exists() for f in TOKENIZER_FILES) else base_model_path
    return load_processing_class(str(source), vision, trust_remote_code)


def _replace_folder(tmp: Path, out: Path) -> None:
    """Move `tmp` to `out`; an old `out` is renamed away first and deleted only once the new one is in place."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def merge_adapter_isolated(base_model_path: str, adapter_path: str | Path, output_dir: str | Path, *,
                           dtype: MergeDtype = "bfloat16", trust_remote_code: bool = False,
                           allow_other_base: bool = False) -> Path:
    """`merge_adapter(..., overwrite=True)`, in a fresh process when Unsloth has patched this one."""
    if "unsloth" not in sys.modules:
        return merge_adapter(base_model_path, adapter_path, output_dir, dtype=dtype, overwrite=True,
                             trust_remote_code=trust_remote_code, allow_other_base=allow_other_base)
    cmd = [sys.executable, "-m", "training_hub.export", str(base_model_path), str(adapter_path), str(output_dir),
           "--dtype", dtype, "--overwrite"] + (["--trust-remote-code"] if trust_remote_code else []) + (
           ["--allow-other-base"] if allow_other_base else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"merging the adapter failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    return Path(output_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training_hub.export", description=merge_adapter.__doc__.split("\n")[0])
    parser.add_argument("base_model_path")
    parser.add_argument("adapter_path")
    parser.add_argument("output_dir")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--allow-other-base", action="store_true",
                        help="merge although the adapter records another base model (e.g. a renamed copy)")
    args = parser.parse_args(argv)
    out = merge_adapter(args.base_model_path, args.adapter_path, args.output_dir, dtype=args.dtype,
                        overwrite=args.overwrite, trust_remote_code=args.trust_remote_code,
                        allow_other_base=args.allow_other_base)
    print(f"training_hub: merged model written to {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
