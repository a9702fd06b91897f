"""The `training-hub` command (also `thub`, and `python -m training_hub`, which torchrun can launch).

    training-hub lora-sft -c run.yaml --learning-rate 1e-4     (alias: train; flags override the YAML file)
    training-hub preview --data train.jsonl --model PATH [--tokens] [--row N | --random]
    training-hub merge BASE ADAPTER OUT [--dtype bfloat16]
    training-hub quickstart [--model PATH_OR_ID] [--output-dir DIR]

Every `lora_sft` parameter is a flag (`--lora-r` or `--lora_r`) and a YAML key, with its help line from the
parameter reference. Values from the command line and from YAML are coerced to the field's annotation by
pydantic in lax mode, so `1e-4`, `yes` and `q_proj,v_proj` mean what they say. Every error is printed as one
line per problem on stderr: exit code 2 for bad input, 3 for a stopped run, 1 for anything else
(`--traceback` shows the full traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import functools
import inspect
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from .checkpoints import TrainingStopped
from .config import PARAMETER_NAMES, REQUIRED, ConfigError, LoraSFTConfig, type_name
from .hardware import is_main_process
from .reference import SECTIONS, cli_help

PROG = "training-hub"
# Parameters that take Python objects; the CLI and YAML files cannot express them.
PYTHON_ONLY = {"callbacks": "TrainerCallback objects can only be passed to lora_sft from Python"}
CLI_PARAMETERS = tuple(name for name in PARAMETER_NAMES if name not in PYTHON_ONLY)
REQUIRED_PARAMETERS = tuple(f.name for f in dataclasses.fields(LoraSFTConfig) if f.default is REQUIRED)
NONE_WORDS = ("none", "null", "~")
EXIT_BAD_INPUT, EXIT_STOPPED, EXIT_FAILED = 2, 3, 1
VALUE_RULES = ("booleans: --x, --no-x or --x true/false/yes/no/1/0; lists: --x a,b or --x a --x b; mappings: "
               "--x '{q_proj: 8}'; 'none' for an optional value")


# ---- values: text (flags) or YAML -> the field's type ---------------------------------------------------------

@functools.cache
def field_type(name: str) -> Any:
    return typing.get_type_hints(LoraSFTConfig)[name]


def members(tp: Any) -> tuple[Any, ...]:
    """The alternatives of a Union (one element for any other type)."""
    return typing.get_args(tp) if typing.get_origin(tp) in (Union, types.UnionType) else (tp,)


def choices(tp: Any) -> list[Any]:
    """Every Literal value a field accepts."""
    return [c for m in members(tp) if typing.get_origin(m) is Literal for c in typing.get_args(m)]


def accepts(tp: Any, kind: type) -> bool:
    return any(m is kind or typing.get_origin(m) is kind for m in members(tp))


@functools.cache
def type_adapter(name: str):
    """pydantic's lax validation of the field's annotation. Unions are tried left to right, so that 'true' is the
    bool True (not the string) for `bool | Literal['auto'] | str`, and '8' the int 8 for `int | str`."""
    from pydantic import ConfigDict, Field, TypeAdapter

    tp = field_type(name)
    if len([m for m in members(tp) if m is not type(None)]) > 1:  # pydantic takes `X | None` as a nullable X
        tp = typing.Annotated[tp, Field(union_mode="left_to_right")]
    return TypeAdapter(tp, config=ConfigDict(coerce_numbers_to_str=True))  # a YAML `run_name: 2024` is text


def coerce(name: str, value: Any) -> Any:
    """`value` (flag text, a list of flag texts, or a YAML value) as the type of parameter `name`.

    Raises ValueError with the expected type (and the closest choice) when it does not fit."""
    tp = field_type(name)
    if isinstance(value, str) and value.strip().lower() in NONE_WORDS and not accepts(tp, str) and (
            accepts(tp, type(None)) or LoraSFTConfig.__dataclass_fields__[name].default is None):
        return None
    if tp is Any:  # data_path / eval_data_path: a path from the command line or YAML
        return value
    if accepts(tp, list) and isinstance(value, (str, list)):
        value = split_list(value)
    elif accepts(tp, dict) and isinstance(value, str):
        value = read_mapping(value)
    if isinstance(value, bool) and not accepts(tp, bool):  # pydantic's lax mode would read True as 1
        raise ValueError(expected(tp, value))
    from pydantic import ValidationError

    try:
        return type_adapter(name).validate_python(value)
    except ValidationError:
        raise ValueError(expected(tp, value)) from None


def split_list(value: str | list) -> list:
    """'a,b' -> ['a', 'b']; repeated flags (a list of such texts) are joined."""
    items = value if isinstance(value, list) else [value]
    return [part.strip() for item in items for part in (item.split(",") if isinstance(item, str) else [item])
            if not isinstance(part, str) or part.strip()]


def read_mapping(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text  # pydantic then reports the expected mapping


def expected(tp: Any, value: Any) -> str:
    """What the field takes, with the closest choice to a mistyped word."""
    hint = did_you_mean(value, [str(c) for c in choices(tp)], repr) if isinstance(value, str) else ""
    return f"expected {type_name(tp)}{hint}"


def coerce_all(raw: dict[str, Any], where: typing.Callable[[str], str]) -> tuple[dict[str, Any], list[str]]:
    """Coerce every value; returns the values and every problem, each naming where the value came from."""
    values, problems = {}, []
    for name, value in raw.items():
        try:
            values[name] = coerce(name, value)
        except ValueError as exc:
            problems.append(f"{where(name)} {value!r}: {exc}")
    return values, problems


def did_you_mean(word: str, options: typing.Iterable[str], show: typing.Callable[[str], str] = str) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {show(close[0])}?)" if close else ""


# ---- the YAML file -------------------------------------------------------------------------------------------

def key_name(key: Any) -> str:
    """YAML keys may be written like flags: `lora-r` is `lora_r`."""
    return str(key).replace("-", "_")


def unique_key_loader(label: str):
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        """PyYAML keeps the last of two equal keys silently; a run config with `lora_r` twice is a mistake."""

        def construct_mapping(self, node, deep=False):
            first_line: dict[str, int] = {}
            problems = []
            for key_node, _ in node.value:
                key, line = key_name(self.construct_object(key_node, deep=True)), key_node.start_mark.line + 1
                if key in first_line:
                    problems.append(f"{label} line {line}: {key!r} is given twice (first at line {first_line[key]})")
                first_line.setdefault(key, line)
            if problems:
                raise ConfigError(problems)
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def read_config_file(path: str) -> dict[str, Any]:
    """The parameters of a YAML file, keys as parameter names, values as written (`coerce_all` types them).

    Raises ConfigError naming every unknown key (with the closest parameter), every duplicate key, or the
    YAML syntax error with its line."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise ConfigError([f"--config {path}: no such file"])
    try:
        values = yaml.load(file.read_text(), Loader=unique_key_loader(path))
    except yaml.MarkedYAMLError as exc:
        line = f" line {exc.problem_mark.line + 1}" if exc.problem_mark else ""
        raise ConfigError([f"{path}{line}: not valid YAML ({exc.problem or exc.context})"]) from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError([f"{path}: expected a mapping of parameter: value, got a {type(values).__name__}"])
    values = {key_name(k): v for k, v in values.items()}
    problems = [f"{path}: {PYTHON_ONLY[k]}" if k in PYTHON_ONLY else
                f"{path}: unknown parameter {k!r}{did_you_mean(k, CLI_PARAMETERS, repr)}"
                for k in values if k not in CLI_PARAMETERS]
    if problems:
        raise ConfigError(problems)
    return values


# ---- flags ---------------------------------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are raised as ConfigError (printed as one line), not usage text + exit."""

    def error(self, message: str):
        raise ConfigError([message])


class FieldValue(argparse.Action):
    """Keeps a parameter's flag text for `coerce`; a bare boolean flag means True, repeated list flags add up."""

    def __call__(self, parser, namespace, values, option_string=None):
        if accepts(field_type(self.dest), list):
            values = [*getattr(namespace, self.dest, []), values]
        setattr(namespace, self.dest, values)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def kebab(option: str) -> str:
    """The spelling the help shows: --lora_r -> --lora-r."""
    return flag(option[2:]) if option.startswith("--") else option


def add_option(container, name: str, *aliases: str, **kwargs) -> argparse.Action:
    """`--kebab-case` in the help; `--snake_case` (and any alias) accepted too, hidden from the help."""
    action = container.add_argument(flag(name), dest=kwargs.pop("dest", name), **kwargs)
    hidden = [a for a in ("--" + name, *aliases) if a != flag(name)]
    if hidden:
        container.add_argument(*hidden, dest=action.dest, **{**kwargs, "help": argparse.SUPPRESS})
    return action


def metavar(name: str) -> str:
    """What a flag takes, e.g. N, X, BOOL, A,B or {auto,unsloth,peft}; long lists of choices are left to the help
    line, which names every choice."""
    words = {bool: "BOOL", int: "N", float: "X", str: "TEXT", list: "A,B", dict: "MAPPING"}
    tp = field_type(name)
    if len(choices(tp)) > 4:
        return "CHOICE"
    parts = []
    for m in members(tp):
        if typing.get_origin(m) is Literal:
            parts += [str(c) for c in typing.get_args(m)]
        elif m is not type(None):
            parts.append(words.get(typing.get_origin(m) or m, "PATH"))
    return parts[0] if len(parts) == 1 and not choices(tp) else "{" + ",".join(parts) + "}"


def add_parameter_flag(container, name: str, *aliases: str) -> None:
    """One flag per lora_sft parameter; booleans also take no value (True) and have --no-x."""
    boolean = accepts(field_type(name), bool)
    add_option(container, name, *aliases, action=FieldValue, default=argparse.SUPPRESS, help=cli_help(name),
               metavar=metavar(name), **({"nargs": "?", "const": True} if boolean else {}))
    if boolean:
        add_option(container, "no_" + name, "--no-" + name, dest=name, action="store_const", const=False,
                   default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def given_parameters(args: argparse.Namespace, names: typing.Iterable[str]) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


def add_lora_sft_parser(commands) -> None:
    parser = commands.add_parser(
        "lora-sft", aliases=["train"], help="fine-tune with LoRA/QLoRA from flags and/or a YAML file",
        usage=f"{PROG} lora-sft [-c FILE.yaml] [--PARAMETER VALUE ...]",
        description=f"Every lora_sft parameter is a flag (--lora-r or --lora_r) and a YAML key; flags override the "
                    f"file. {VALUE_RULES}. Not on the command line: {', '.join(PYTHON_ONLY)} (Python only).")
    parser.add_argument("-c", "--config", metavar="FILE.yaml", help="YAML file of lora_sft parameters")
    group = parser
    for name in CLI_PARAMETERS:
        if name in SECTIONS:
            group = parser.add_argument_group(SECTIONS[name])
        add_parameter_flag(group, name)


def lora_sft_config(args: argparse.Namespace) -> LoraSFTConfig:
    """The YAML file's values, overridden by the flags, coerced and validated; every problem at once."""
    from_file = read_config_file(args.config) if args.config else {}
    file_values, problems = coerce_all(from_file, lambda name: f"{args.config}: {name}")
    flag_values, flag_problems = coerce_all(given_parameters(args, CLI_PARAMETERS), flag)
    values = {**file_values, **flag_values}
    problems += flag_problems + [f"{n} is required: give {flag(n)} or put it in the --config file"
                                 for n in REQUIRED_PARAMETERS if n not in values and n not in from_file]
    if problems:
        raise ConfigError(problems)
    return LoraSFTConfig(**values)


def run_lora_sft(args: argparse.Namespace) -> int:
    from .recipe import run

    config = lora_sft_config(args)
    with model_hub_errors(config.model_path):
        result = run(config)
    if is_main_process() and not config.dry_run:
        print(f"adapter: {result.adapter_path}")
    return 0


# ---- preview, merge, quickstart ------------------------------------------------------------------------------

@functools.cache
def preview_parameters() -> tuple[str, ...]:
    """The lora_sft parameters that prepare_dataset takes: the preview shows exactly what training would see."""
    from .api import prepare_dataset

    return tuple(p for p in inspect.signature(prepare_dataset).parameters if p in CLI_PARAMETERS)


def add_preview_parser(commands) -> None:
    parser = commands.add_parser("preview", help="show how a dataset is tokenized and which tokens carry loss",
                                 description=f"Rows are numbered after invalid/empty rows are dropped. {VALUE_RULES}.")
    for name in preview_parameters():
        add_parameter_flag(parser, name, *{"data_path": ["--data"], "model_path": ["--model"]}.get(name, []))
    add_option(parser, "num_examples", type=int, default=2, metavar="N", help="rows to show from the start")
    which = parser.add_mutually_exclusive_group()
    add_option(which, "row", type=int, metavar="N", help="show row N (0-based) instead")
    add_option(which, "random", action="store_true", help="show one random row instead")
    add_option(parser, "tokens", action="store_true", help="also list every token: position, id, label, text")


def run_preview(args: argparse.Namespace) -> int:
    import random

    from .api import prepare_dataset
    from .data import format_example, load_tokenizer

    values, problems = coerce_all(given_parameters(args, preview_parameters()), flag)
    problems += [f"{flag(n)} is required" for n in ("data_path", "model_path") if n not in values]
    if problems:
        raise ConfigError(problems)
    model_path = values.pop("model_path")
    with model_hub_errors(model_path):
        tokenizer = load_tokenizer(model_path, values.get("trust_remote_code", False))
    prepared = prepare_dataset(values.pop("data_path"), tokenizer=tokenizer, **values)
    rows = prepared.dataset
    print(prepared.summary)
    if args.row is not None and not 0 <= args.row < len(rows):
        raise ConfigError([f"--row {args.row}: the data has rows 0 to {len(rows) - 1}"])
    shown = ([args.row] if args.row is not None else [random.randrange(len(rows))] if args.random
             else range(min(args.num_examples, len(rows))))
    for i in shown:
        print(f"\n--- row {i} (trained text between [[ and ]]) ---")
        print(format_example(rows[i]["input_ids"], rows[i]["labels"], tokenizer))
        if args.tokens:
            print(token_table(rows[i]["input_ids"], rows[i]["labels"], tokenizer))
    return 0


def token_table(input_ids: list[int], labels: list[int], tokenizer) -> str:
    """One line per token: position, id, label (-100: no loss) and the token's text."""
    lines = [f"{'pos':>5} {'id':>7} {'label':>7}  text"]
    for pos, (token_id, label) in enumerate(zip(input_ids, labels)):
        lines.append(f"{pos:>5} {token_id:>7} {label:>7}  {tokenizer.decode([token_id])!r}")
    return "\n".join(lines)


def add_merge_parser(commands) -> None:
    parser = commands.add_parser("merge", help="fold a LoRA adapter into its base model (16-bit safetensors)",
                                 description="Writes base + adapter as one model that transformers and vLLM load.")
    parser.add_argument("base", help="the base model the adapter was trained on (folder or hub id)")
    parser.add_argument("adapter", help="the adapter folder (a lora-sft output folder or a checkpoint-N in it)")
    parser.add_argument("output", help="where the merged model goes (absent or empty unless --overwrite)")
    add_option(parser, "dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
               help="weight dtype of the merged model")
    add_option(parser, "overwrite", action="store_true", help="replace an existing output folder")
    add_option(parser, "trust_remote_code", action="store_true", help="allow the model's own Python code to run")
    add_option(parser, "allow_other_base", action="store_true",
               help="merge although the adapter records another base model (the shapes must still fit)")


def run_merge(args: argparse.Namespace) -> int:
    from .export import merge_adapter

    with model_hub_errors(args.base):
        out = merge_adapter(args.base, args.adapter, args.output, dtype=args.dtype, overwrite=args.overwrite,
                            trust_remote_code=args.trust_remote_code, allow_other_base=args.allow_other_base)
    print(f"merged model: {out}")
    return 0


def add_quickstart_parser(commands) -> None:
    parser = commands.add_parser("quickstart", help="train a tiny model offline on bundled data (about a minute "
                                                    "on a CPU)")
    add_option(parser, "model", help="a model folder or hub id to fine-tune instead of the built-in tiny model")
    add_option(parser, "output_dir", default="quickstart-output", help="where the tiny model and adapter go")
    add_option(parser, "max_steps", type=int, default=600, help="optimizer steps")
    add_option(parser, "backend", choices=["auto", "unsloth", "peft"], default="auto", help=cli_help("backend"))


def run_quickstart(args: argparse.Namespace) -> int:
    from .quickstart import run_quickstart as quickstart

    with model_hub_errors(args.model):
        return quickstart(args.model, args.output_dir, args.max_steps, args.backend)


COMMANDS = {"lora-sft": run_lora_sft, "train": run_lora_sft, "preview": run_preview, "merge": run_merge,
            "quickstart": run_quickstart}


def build_parser() -> Parser:
    from . import __version__

    parser = Parser(prog=PROG, allow_abbrev=False, description="LoRA/QLoRA fine-tuning in one call. "
                    f"`{PROG} COMMAND --help` lists a command's flags.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_lora_sft_parser(commands)
    add_preview_parser(commands)
    add_merge_parser(commands)
    add_quickstart_parser(commands)
    for command in {id(c): c for c in commands.choices.values()}.values():  # 'train' is 'lora-sft'
        command.allow_abbrev = False  # a prefix must not silently pick a flag (--learning for --learning-rate)
        command.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
        command.set_defaults(command_parser=command)  # for the did-you-mean of an unknown flag
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse, reporting every unknown flag with the closest known one."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        known = [s for action in args.command_parser._actions for s in action.option_strings]
        flags = [u.split("=", 1)[0] for u in unknown if u.startswith("-")]
        raise ConfigError([f"{f}: {PYTHON_ONLY[key_name(f[2:])]}" if key_name(f[2:]) in PYTHON_ONLY else
                           f"unknown flag {f}{did_you_mean(f, known, kebab)}" for f in flags]
                          or [f"unexpected argument(s): {' '.join(unknown)}"])
    return args


# ---- errors --------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def model_hub_errors(model: str | None):
    """Turn the model hub's errors (offline, no such repo, gated) into one line naming the model."""
    try:
        yield
    except Exception as exc:
        problem = hub_problem(exc, model)
        if problem is None:
            raise
        raise ConfigError([problem]) from exc


def hub_problem(exc: BaseException, model: str | None) -> str | None:
    """A one-line description when `exc`, or an exception it was raised from, is the model hub's."""
    from huggingface_hub import errors

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, errors.GatedRepoError):
            return (f"{model!r} is a gated model on the hub: request access and log in (`hf auth login`), or give a "
                    "local folder")
        if isinstance(seen, errors.RepositoryNotFoundError):
            return f"{model!r} is neither a local folder nor a model on the hub (check the spelling)"
        # The hub client turns connection failures into these once it has looked in its cache.
        if isinstance(seen, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
            return f"could not reach the model hub for {model!r} (offline?): give a local folder"
        if isinstance(seen, errors.HfHubHTTPError):
            return f"the model hub answered an error for {model!r}: {str(seen).splitlines()[0]}"
        seen = seen.__cause__ or seen.__context__
    return None


def error_lines(exc: Exception) -> tuple[int, list[str]]:
    """The exit code and the lines to print for an error."""
    if isinstance(exc, TrainingStopped):  # SIGTERM/SIGINT (a checkpoint was saved) or divergence
        return EXIT_STOPPED, [f"{PROG}: stopped: {exc}"]
    if isinstance(exc, ConfigError):
        return EXIT_BAD_INPUT, [f"{PROG}: error: {p}" for p in exc.problems]
    if isinstance(exc, (ValueError, FileNotFoundError, FileExistsError, ImportError)):  # DataError is a ValueError
        return EXIT_BAD_INPUT, [f"{PROG}: error: {exc}"]
    return EXIT_FAILED, [f"{PROG}: error: {type(exc).__name__}: {exc} (--traceback shows where)"]


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (0 ok, 2 bad input, 3 stopped run, 1 other errors)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse(argv)
        return COMMANDS[args.command](args)
    except Exception as exc:
        if "--traceback" in argv:
            raise
        code, lines = error_lines(exc)
        if code != EXIT_BAD_INPUT or is_main_process():  # bad input is the same on every torchrun rank: say it once
            print("\n".join(lines), file=sys.stderr)
        return code
    except KeyboardInterrupt:  # outside training (which saves a checkpoint and raises TrainingStopped)
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
