"""Several processes: checking the launch settings, and starting the workers from `lora_sft` itself.

`lora_sft(..., nproc_per_node=N)` called from a plain `python` process (or a notebook) starts N workers
through torch.distributed's elastic launcher (the engine behind torchrun). Each worker is a fresh
`python -m training_hub.worker run.json` process, so the user's script is not run again in it; the run's
settings travel in run.json (in-memory data as a JSON-lines file, callbacks pickled). Rank 0 writes a
result file that the calling process reads. Under torchrun (or any torchelastic launch) nothing is
launched again: the settings are only checked against the running launch.

Rendezvous: one node uses a c10d rendezvous on a free local port. Several nodes meet at `rdzv_endpoint`
(or `master_addr:master_port`): with `node_rank` given, a static rendezvous that numbers the nodes as
given (node 0 hosts the store); without it, a c10d rendezvous that numbers them in order of arrival.

The light functions here (checks, the launch plan) import nothing heavy; `config.py` calls them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("training_hub")

DEFAULT_C10D_PORT = 29400  # torchrun's defaults
DEFAULT_MASTER_PORT = 29500
DEFAULT_RUN_ID = "training_hub"  # every node of a multi-node job must use the same id
SPEC_FILE = "run.json"
RESULT_FILE = "result.json"
CALLBACKS_FILE = "callbacks.pkl"
# Launch settings that say where the nodes meet (and which node this is), not what is trained.
RENDEZVOUS_ADDRESS_FIELDS = ("node_rank", "rdzv_id", "rdzv_endpoint", "master_addr", "master_port")
# Seconds a stopping worker gets to save its checkpoint before the launcher kills it (torch's default).
SHUTDOWN_TIMEOUT_S = 30


class WorkerFailed(RuntimeError):
    """A worker process failed; the message carries the first failing rank's error and where its log is."""


def under_launcher(environ: Mapping[str, str]) -> bool:
    """True inside processes started by torchrun / torchelastic (or by `lora_sft` itself)."""
    return "TORCHELASTIC_RUN_ID" in environ or "LOCAL_WORLD_SIZE" in environ


# ---- checks (pure Python) -------------------------------------------------------------------------------------

def split_endpoint(endpoint: str, default_port: int) -> tuple[str, int] | None:
    """("host", port) of "host[:port]", or None when it is not of that form."""
    host, sep, port = endpoint.strip().rpartition(":")
    if not sep:
        host, port = endpoint.strip(), str(default_port)
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        return None
    return host, int(port)


def launch_problems(config, environ: Mapping[str, str]) -> list[str]:
    """Every problem with the launch settings (nproc_per_node, nnodes, node_rank, rdzv_*, master_*), at once.

    Outside a launch they describe the processes `lora_sft` will start; inside one (torchrun) they must agree
    with it where the environment records it (processes per node, nodes, this node's rank, the run id)."""
    c, p = config, []
    nodes = c.nnodes if c.nnodes is not None else 1
    if isinstance(c.nproc_per_node, int) and c.nproc_per_node < 1:
        p.append(f"nproc_per_node={c.nproc_per_node}: give a number of processes >= 1, 'auto' or 'gpu'")
    if nodes < 1:
        p.append(f"nnodes={c.nnodes}: give a number of nodes >= 1")
    if c.node_rank is not None and nodes >= 1 and not 0 <= c.node_rank < nodes:
        p.append(f"node_rank={c.node_rank}: with nnodes={nodes} the valid node ranks are {list(range(nodes))}")
    if c.rdzv_endpoint is not None and split_endpoint(c.rdzv_endpoint, DEFAULT_C10D_PORT) is None:
        p.append(f"rdzv_endpoint={c.rdzv_endpoint!r}: expected 'host:port' (e.g. 'node0.cluster:29400')")
    if c.master_port is not None and not 1 <= c.master_port <= 65535:
        p.append(f"master_port={c.master_port}: a TCP port in 1..65535")
    if c.rdzv_endpoint is not None and (c.master_addr is not None or c.master_port is not None):
        p.append("rdzv_endpoint and master_addr/master_port are both given: they name the same meeting point; "
                 "give rdzv_endpoint='host:port' or master_addr (+ master_port), not both")
    if nodes > 1 and c.rdzv_endpoint is None and c.master_addr is None:
        p.append(f"nnodes={nodes}: the nodes need a meeting point; give rdzv_endpoint='host:port' (a host every "
                 "node reaches) or master_addr='host' with node_rank")
    if nodes > 1 and c.master_addr is not None and c.node_rank is None:
        p.append(f"master_addr={c.master_addr!r} with nnodes={nodes} needs node_rank (one of "
                 f"{list(range(nodes))}; 0 on the host master_addr names)")
    if c.rdzv_id is not None and not str(c.rdzv_id).strip():
        p.append("rdzv_id='': give the job's id (the same on every node) or leave it unset")
    if under_launcher(environ):
        p += running_launch_problems(c, environ)
    return p + model_splitting_problems(c)


def running_launch_problems(c, environ: Mapping[str, str]) -> list[str]:
    """The settings against the launch this process runs in (rendezvous addresses are not recorded there)."""
    p = []
    local = int(environ.get("LOCAL_WORLD_SIZE", "1"))
    world = int(environ.get("WORLD_SIZE", str(local)))
    if isinstance(c.nproc_per_node, int) and c.nproc_per_node != local:
        p.append(f"nproc_per_node={c.nproc_per_node}: this process was started by a launcher (torchrun) with "
                 f"{local} process(es) per node; leave nproc_per_node unset (or {local}), or run the script with "
                 "plain `python` so that lora_sft starts the processes itself")
    if c.nnodes is not None and local and c.nnodes != world // local:
        p.append(f"nnodes={c.nnodes}: the running launch has {world // local} node(s) ({world} processes, {local} "
                 "per node); leave nnodes unset under torchrun, or equal to torchrun's --nnodes")
    if c.node_rank is not None and "GROUP_RANK" in environ and c.node_rank != int(environ["GROUP_RANK"]):
        p.append(f"node_rank={c.node_rank}: the running launch made this node number {environ['GROUP_RANK']}; "
                 "leave node_rank unset under torchrun")
    if c.rdzv_id is not None and "TORCHELASTIC_RUN_ID" in environ and str(c.rdzv_id) != environ["TORCHELASTIC_RUN_ID"]:
        p.append(f"rdzv_id={c.rdzv_id!r}: the running launch's id is {environ['TORCHELASTIC_RUN_ID']!r}; "
                 "leave rdzv_id unset under torchrun")
    return p


def model_splitting_problems(c) -> list[str]:
    """`enable_model_splitting` settings refused before anything loads (the hardware is checked in the plan)."""
    if not c.enable_model_splitting:
        return []
    p = []
    if c.backend == "unsloth":
        p.append("enable_model_splitting=True with backend='unsloth': Unsloth's kernels and patches assume the whole "
                 "model on one GPU; use backend='peft' (backend='auto' picks it for model splitting)")
    return p


# Why CPU processes do not shard the model.
CPU_SHARDING_REFUSED = (
    "enable_model_splitting=True with CPU processes: sharding (FSDP2) runs through transformers' Trainer and "
    "accelerate, and accelerate 1.15 turns FSDP on only for GPU processes (a CPU/gloo launch gets plain DDP with the "
    "FSDP settings ignored, and DDP refuses sharded parameters). On the CPU leave enable_model_splitting unset "
    "(every process holds the whole model in RAM); shard on GPUs")
EIGHT_BIT_SHARDING_REFUSED = (
    "enable_model_splitting=True with load_in_8bit=True under a launch (FSDP2 sharding): bitsandbytes stores 8-bit weights "
    "as int8 tensors that FSDP2 cannot shard; use load_in_4bit=True (stored in the compute dtype, which FSDP2 shards) "
    "or 16-bit LoRA")


def resolve_model_splitting(enabled: bool, hw, world_size: int, launched: bool = False, quantization: str | None = None,
                            compute_dtype: str = "bfloat16") -> tuple[str | None, list[str]]:
    """How `enable_model_splitting` runs, with the plan's notes: "fsdp2" when the run has its own processes
    (`launched`: torchrun or lora_sft's own launch, even one process), "balanced" when one plain process spreads the
    layers over the visible GPUs (transformers' device_map="balanced", the layers run one GPU after another), None
    when splitting is off. Raises ConfigError where it cannot run."""
    from .config import ConfigError

    if not enabled:
        return None, []
    if launched or world_size > 1:
        problems = sharding_problems(hw.gpu_count, quantization)
        if problems:
            raise ConfigError(problems)
        return "fsdp2", fsdp2_notes(world_size, quantization == "4bit", compute_dtype)
    if not hw.is_gpu:
        raise ConfigError(["enable_model_splitting=True on the CPU: there is nothing to split over (one process "
                           "already holds the whole model in RAM); leave it unset"])
    if hw.gpu_count < 2:
        raise ConfigError([f"enable_model_splitting=True with {hw.gpu_count} visible GPU: nothing to split over; use "
                           "load_in_4bit=True (QLoRA: about a quarter of the weight memory), more GPUs in one process, "
                           "or torchrun (FSDP2 sharding over the processes)"])
    return "balanced", [f"model split over {hw.gpu_count} GPUs (device_map='balanced': each holds a share of the "
                        "layers, which run one GPU after another)"]


def sharding_problems(gpu_count: int, quantization: str | None) -> list[str]:
    """Why this node cannot shard the model over its processes (FSDP2), if it cannot."""
    return ([] if gpu_count else [CPU_SHARDING_REFUSED]) + ([EIGHT_BIT_SHARDING_REFUSED] if quantization == "8bit" else [])


def fsdp2_notes(world_size: int, quantized_4bit: bool, compute_dtype: str) -> list[str]:
    """What the FSDP2 route does and what each rank holds, for the plan's notes."""
    notes = [f"model sharded over {world_size} process(es) with FSDP2 (transformers' Trainer and accelerate: "
             "fully_shard of each decoder layer, the embeddings and the head): each GPU holds 1/"
             f"{world_size} of the base weights, of the LoRA weights and of their optimizer state, and gathers one "
             "layer at a time to compute; the adapter is gathered on rank 0 and saved as a normal PEFT adapter",
             "backend peft for FSDP2: Unsloth patches its own kernels onto one whole model per GPU and does not "
             "support FSDP"]
    if world_size == 1:
        notes.append("FSDP2 over one process: the one shard is the whole model, so it saves no memory (the same code "
                     "path as several GPUs)")
    if quantized_4bit:
        notes.append(f"QLoRA under FSDP2: 4-bit weights stored as {compute_dtype} (bnb_4bit_quant_storage) so that "
                     "FSDP2 can shard them; each process loads the 4-bit base onto its GPU, then keeps its shard")
    else:
        notes.append("each process loads the base into CPU RAM (one copy per process on a node), then keeps its "
                     "shard on its GPU")
    return notes


# ---- tokenizing once per node ----------------------------------------------------------------------------------

def node_main_first(environ: Mapping[str, str], on_gpu: bool, cached: bool):
    """A context that the node's local main process (local rank 0) runs through first, the node's other processes
    after it, so that they read the tokenized data from the cache it wrote instead of tokenizing again. Without a
    cache (`cached` False) or with one process per node every process goes on at once (a null context).

    This starts the process group early, through accelerate's `PartialState`, with the settings transformers'
    Trainer gives it later (the device kind and TrainingArguments' default `ddp_timeout`), so the Trainer
    reuses it."""
    if not cached or int(environ.get("LOCAL_WORLD_SIZE", "1")) < 2:
        return contextlib.nullcontext()
    from datetime import timedelta

    from accelerate import PartialState
    from transformers import TrainingArguments

    state = PartialState(cpu=not on_gpu, timeout=timedelta(seconds=TrainingArguments.ddp_timeout))
    return state.local_main_process_first()


# ---- the launch plan -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LaunchPlan:
    """How `lora_sft` starts its workers on this node."""

    nproc_per_node: int
    nnodes: int
    node_rank: int | None
    rdzv_backend: str  # "c10d" | "static"
    rdzv_endpoint: str
    run_id: str

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    def describe(self) -> str:
        where = f"node {self.node_rank} of {self.nnodes}, " if self.nnodes > 1 and self.node_rank is not None else (
            f"{self.nnodes} nodes, " if self.nnodes > 1 else "")
        return (f"launching {self.nproc_per_node} worker process(es) ({where}world size {self.world_size}; "
                f"{self.rdzv_backend} rendezvous at {self.rdzv_endpoint}, run id {self.run_id!r})")


def resolve_nproc(value: int | str | None, gpu_count: int) -> int:
    """Processes per node: an int as given; "auto" every visible GPU (1 process on a CPU-only machine, which
    then uses all cores); "gpu" every visible GPU, refused without one."""
    from .config import ConfigError

    if isinstance(value, int):
        return value
    if value == "gpu" and gpu_count == 0:
        raise ConfigError(["nproc_per_node='gpu': this machine has no visible CUDA GPU; give a number of processes "
                           "(e.g. 2: CPU processes share the cores) or 'auto' (one process per GPU, 1 on the CPU)"])
    return max(1, gpu_count) if value in ("auto", "gpu") else 1


def needs_launch(config, environ: Mapping[str, str], gpu_count: int | None = None) -> bool:
    """Whether `lora_sft` must start worker processes (several per node, or several nodes) instead of training
    in this process. `gpu_count` is needed only for nproc_per_node "auto"/"gpu" (counted when not given)."""
    if under_launcher(environ):
        return False
    if (config.nnodes or 1) > 1:
        return True
    if config.nproc_per_node in ("auto", "gpu"):
        from .hardware import gpu_count as count_gpus

        return resolve_nproc(config.nproc_per_node, count_gpus() if gpu_count is None else gpu_count) > 1
    return (config.nproc_per_node or 1) > 1


def make_launch_plan(config, gpu_count: int) -> LaunchPlan:
    """Turn the validated settings into a launch; assumes `launch_problems` found nothing. Raises ConfigError
    for more processes than GPUs on a GPU machine (two processes cannot share one GPU's NCCL rank), and for model
    splitting the workers could not run (`sharding_problems`)."""
    from .config import ConfigError

    nproc = resolve_nproc(config.nproc_per_node, gpu_count)
    if config.enable_model_splitting:  # the workers would shard the model: refused before any of them starts
        problems = sharding_problems(gpu_count, "8bit" if config.load_in_8bit else None)
        if problems:
            raise ConfigError(problems)
    if gpu_count and nproc > gpu_count:
        raise ConfigError([f"nproc_per_node={config.nproc_per_node!r}: this node has {gpu_count} visible GPU(s), one "
                           f"per process; valid values: {list(range(1, gpu_count + 1))}, 'auto' or 'gpu'"])
    nodes = config.nnodes or 1
    run_id = str(config.rdzv_id) if config.rdzv_id is not None else DEFAULT_RUN_ID
    if config.rdzv_endpoint is not None or config.master_addr is not None or config.master_port is not None:
        if config.rdzv_endpoint is not None and config.node_rank is None:
            host, port = split_endpoint(config.rdzv_endpoint, DEFAULT_C10D_PORT)
            return LaunchPlan(nproc, nodes, None, "c10d", f"{host}:{port}", run_id)
        default = DEFAULT_C10D_PORT if config.rdzv_endpoint is not None else DEFAULT_MASTER_PORT
        host, port = split_endpoint(config.rdzv_endpoint or f"{config.master_addr or '127.0.0.1'}:"
                                    f"{config.master_port or default}", default)
        return LaunchPlan(nproc, nodes, config.node_rank or 0, "static", f"{host}:{port}", run_id)
    # One node, no meeting point given: a c10d store on a free local port, under a fresh id.
    import uuid

    return LaunchPlan(nproc, 1, None, "c10d", "localhost:0", f"{DEFAULT_RUN_ID}-{uuid.uuid4().hex[:12]}")


# ---- what travels to the workers -------------------------------------------------------------------------------

def _in_memory(value: Any) -> bool:
    return value is not None and not isinstance(value, (str, os.PathLike))


def write_rows(data: Any, path: Path, name: str) -> Path:
    """An in-memory dataset (a list of dicts or a datasets.Dataset) as a JSON-lines file the workers read."""
    rows = data.to_list() if hasattr(data, "to_list") and hasattr(data, "column_names") else data
    if not isinstance(rows, (list, tuple)) or not all(isinstance(r, dict) for r in rows):
        from .config import ConfigError

        raise ConfigError([f"{name}={type(data).__name__}: worker processes read data from a file, a list of dicts or "
                           "a datasets.Dataset; save it to a .jsonl file and pass its path"])
    try:
        text = "".join(json.dumps(row) + "\n" for row in rows)
    except (TypeError, ValueError) as exc:
        from .config import ConfigError

        raise ConfigError([f"{name}: a row cannot be written as JSON for the worker processes ({exc}); save the data "
                           "to a .jsonl/.parquet file and pass its path"]) from exc
    path.write_text(text, encoding="utf-8")
    return path


def pickle_callbacks(callbacks: list[Any]) -> bytes:
    """The callbacks as one pickle the workers load. Each must be picklable and its class importable by the
    workers: a class defined in the script being run (`__main__`) is not, because the script is not re-run."""
    from .config import ConfigError

    problems = []
    for i, callback in enumerate(callbacks):
        cls = callback if isinstance(callback, type) else type(callback)
        if cls.__module__ == "__main__" or "<locals>" in cls.__qualname__:
            where = "in the script being run" if cls.__module__ == "__main__" else "inside a function"
            problems.append(f"callbacks[{i}]={cls.__qualname__} is defined {where}, so the worker processes cannot "
                            "import it (the script is not re-run there); move the class to a module of its own and "
                            "import it, or launch the script with torchrun")
            continue
        try:
            pickle.dumps(callback)
        except Exception as exc:  # pickling raises TypeError, AttributeError or PicklingError by object
            problems.append(f"callbacks[{i}]={cls.__qualname__} cannot be sent to the worker processes "
                            f"({type(exc).__name__}: {exc}); keep only picklable state in it, or launch with torchrun")
    if problems:
        raise ConfigError(problems)
    return pickle.dumps(list(callbacks))


def write_worker_spec(config, folder: Path) -> Path:
    """run.json (the settings as JSON, in-memory data written beside it) and the pickled callbacks."""
    from .config import DATA_PATH_FIELDS

    settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "callbacks"}
    for name in DATA_PATH_FIELDS:
        value = settings[name]
        if _in_memory(value):
            settings[name] = str(write_rows(value, folder / f"{name}.jsonl", name))
        elif isinstance(value, os.PathLike):
            settings[name] = os.fspath(value)
    callbacks = None
    if config.callbacks:
        callbacks = folder / CALLBACKS_FILE
        callbacks.write_bytes(pickle_callbacks(config.callbacks))
    spec = {"config": settings, "callbacks": str(callbacks) if callbacks else None,
            "result": str(folder / RESULT_FILE), "sys_path": [p for p in sys.path if p],
            "log_level": logger.getEffectiveLevel()}
    path = folder / SPEC_FILE
    path.write_text(json.dumps(spec, indent=1, default=str))
    return path


# ---- launching -------------------------------------------------------------------------------------------------

def launch(config):
    """Start the workers for `config`, wait for them, and return rank 0's TrainingResult (model not loaded).

    Raises the first failing rank's error (WorkerFailed; TrainingStopped when the run was stopped), after every
    worker of this node has ended."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, SignalException, Std
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from .checkpoints import TrainingStopped

    from .hardware import gpu_count

    plan = make_launch_plan(config, gpu_count())
    _check_batch(config, plan.world_size)
    folder = Path(tempfile.mkdtemp(prefix="training_hub-launch-"))
    spec = write_worker_spec(config, folder)
    logger.info(plan.describe())
    launch_config = LaunchConfig(
        min_nodes=plan.nnodes, max_nodes=plan.nnodes, nproc_per_node=plan.nproc_per_node, run_id=plan.run_id,
        rdzv_backend=plan.rdzv_backend, rdzv_endpoint=plan.rdzv_endpoint,
        rdzv_configs={"rank": plan.node_rank} if plan.rdzv_backend == "static" else {},
        max_restarts=0,  # a failed run is reported, not restarted from scratch
        monitor_interval=0.5, shutdown_timeout=SHUTDOWN_TIMEOUT_S, log_line_prefix_template="[rank${rank}]:",
        # Every rank's output goes to its own file; the console shows local rank 0 (the others log nothing
        # but their errors, which the raised error names).
        logs_specs=DefaultLogsSpecs(log_dir=str(folder / "logs"), redirects=Std.ALL, tee=Std.ALL,
                                    local_ranks_filter={0}),
    )
    try:
        with _signal_handlers_kept():
            elastic_launch(launch_config, sys.executable)("-u", "-m", "training_hub.worker", str(spec))
    except ChildFailedError as exc:
        raise _worker_error(exc, folder) from None
    except SignalException as exc:
        raise TrainingStopped(f"{_stopped_by_signal(exc.sigval.name, config)}\n({_logs_line(folder)})") from None
    result = read_result(folder / RESULT_FILE, config)
    shutil.rmtree(folder, ignore_errors=True)
    return result


@contextlib.contextmanager
def _signal_handlers_kept():
    """The launcher installs handlers that turn SIGTERM/SIGINT/SIGHUP/SIGQUIT into its SignalException (to forward
    them to the workers) and leaves them installed; the caller's own handlers come back afterwards (so Ctrl-C in a
    notebook raises KeyboardInterrupt again)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    names = [n for n in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT") if hasattr(signal, n)]
    previous = {name: signal.getsignal(getattr(signal, name)) for name in names}
    try:
        yield
    finally:
        for name, handler in previous.items():
            if handler is not None:  # None: installed outside Python, cannot be put back
                signal.signal(getattr(signal, name), handler)


def _check_batch(config, world_size: int) -> None:
    """Batch settings that cannot be split over `world_size` processes fail here, before any process starts."""
    from .plan import MAX_AUTO_MICRO_BATCH, resolve_batch

    resolve_batch(config.effective_batch_size, config.micro_batch_size, config.gradient_accumulation_steps,
                  world_size, MAX_AUTO_MICRO_BATCH)


# How a rank's error reads when it only saw another rank go away (gloo, NCCL): not the cause of a failed run.
PEER_FAILURE_MARKERS = ("closed by peer", "reset by peer", "Broken pipe", "remote process exited",
                        "communicator was aborted", "remote worker")


def _failure_text(failure) -> str:
    """A failed rank's exception ("Type: message", from the error file `record` wrote), or how it ended."""
    if failure.error_file_data.get("message") in (None, "<NONE>"):  # no error file: killed, or exited without one
        return f"killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with code {failure.exitcode}"
    message = failure.message
    if isinstance(message, dict):  # the error file's {"message": "Type: text", "extraInfo": {...}}
        message = message.get("message", json.dumps(message))
    return str(message)


def _worker_error(exc, folder: Path) -> Exception:
    """One error naming the rank that caused the failure and its message, then one line per rank that failed
    only because of it, and the folder of every rank's log. The cause is the first failure (by time, then
    rank) that is not a lost connection to another rank: the launcher's own "first failure" compares
    whole-second timestamps, so a rank's lost connection can tie with the kill of the rank that caused it."""
    failures = sorted(exc.failures.items(), key=lambda item: (item[1].timestamp, item[0]))
    texts = {rank: _failure_text(failure) for rank, failure in failures}
    causes = [rank for rank, _ in failures if not any(m in texts[rank] for m in PEER_FAILURE_MARKERS)]
    cause = causes[0] if causes else failures[0][0]
    logs = _logs_line(folder)
    type_name, _, text = texts[cause].partition(": ")
    if type_name == "TrainingStopped":  # divergence, reported by the worker
        from .checkpoints import TrainingStopped

        return TrainingStopped(f"{text}\n({logs})")
    lines = [f"rank {cause} (local rank {exc.failures[cause].local_rank}) failed: {texts[cause]}"]
    lines += [f"then rank {rank} failed: {texts[rank][:160]}" for rank, _ in failures if rank != cause]
    return WorkerFailed("\n".join(lines) + f"\n({logs})")


def _logs_line(folder: Path) -> str:
    return f"every rank's output is in {folder / 'logs'}"


def _stopped_by_signal(signal_name: str, config) -> str:
    from .checkpoints import StopRequest, stopped_message

    return stopped_message(StopRequest(signal_name=signal_name), Path(config.ckpt_output_dir), config.learning_rate, "")


def read_result(path: Path, config):
    """The TrainingResult rank 0 wrote; on a node without rank 0, one with the paths only."""
    from .outputs import result
    from .result import TrainingResult

    out = Path(config.ckpt_output_dir)
    if not path.is_file():
        logger.info("rank 0 ran on another node: its metrics and adapter are in ckpt_output_dir there")
        return result(out)
    saved = json.loads(path.read_text())
    return TrainingResult(**{k: Path(v) if k.endswith(("_dir", "_path")) else v for k, v in saved.items()})


def write_result(result, path: Path) -> None:
    """Rank 0's TrainingResult without its in-memory objects (model, tokenizer, trainer), for the caller."""
    from .files import write_atomic

    fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(result)
              if f.name not in ("model", "tokenizer", "trainer")}
    write_atomic(path, json.dumps(fields, default=str))


# ---- multi-process resume on the CPU ---------------------------------------------------------------------------

@functools.cache
def allow_indexed_cpu_map_location() -> None:
    """Let torch.load accept map_location="cpu:N" (registered once per process).

    transformers 5.17 resumes the optimizer of a multi-process run with `map_location=args.device`, which is
    accelerate's "cpu:0" for CPU processes, and torch's CPU deserializer knows only "cpu". torch's documented
    extension point for storage locations (`torch.serialization.register_package`) maps "cpu:N" to the CPU;
    locations it did not accept before are the only ones affected."""
    import torch

    torch.serialization.register_package(11, _cpu_index_tag, _cpu_index_deserialize)  # right after "cpu" (10)


def _cpu_index_deserialize(storage, location: str):
    if location.startswith("cpu:") and location[4:].isdigit():
        return storage
    return None


def _cpu_index_tag(storage):
    return None  # saving is unchanged

