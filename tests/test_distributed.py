"""Several processes: the launch settings (fast, pure), and lora_sft launching its own gloo workers on the CPU.

The end-to-end runs start `tests/distributed_job.py`, a plain `python` script without a `__main__` guard that
calls lora_sft(nproc_per_node=...): the workers must not re-run it. Every wait is bounded by a timeout.
"""

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs import metric_rows
from training_hub import checkpoints, distributed
from training_hub.config import ConfigError, LoraSFTConfig
from training_hub.resume import find_resume

JOB = Path(__file__).with_name("distributed_job.py")
REQUIRED = dict(model_path="m", data_path="d.jsonl", ckpt_output_dir="out")
LAUNCH_TIMEOUT_S = 300


def config(**kwargs) -> LoraSFTConfig:
    return LoraSFTConfig(**{**REQUIRED, **kwargs})


# ---- settings (no process started) ---------------------------------------------------------------------------

def test_impossible_launch_settings_are_all_named_before_anything_starts():
    with pytest.raises(ConfigError) as info:
        config(nnodes=2, node_rank=2, nproc_per_node=0, rdzv_endpoint="host:port", master_addr="10.0.0.1")
    text = str(info.value)
    assert "node_rank=2: with nnodes=2 the valid node ranks are [0, 1]" in text
    assert "nproc_per_node=0" in text and "rdzv_endpoint='host:port': expected 'host:port'" in text
    assert "rdzv_endpoint and master_addr/master_port are both given" in text
    with pytest.raises(ConfigError, match=r"master_addr='10.0.0.1' with nnodes=2 needs node_rank \(one of \[0, 1\]"):
        config(nnodes=2, master_addr="10.0.0.1")


def test_under_torchrun_the_settings_must_agree_with_the_running_launch():
    env = {"TORCHELASTIC_RUN_ID": "job7", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "4", "GROUP_RANK": "1"}
    agreeing = config(nproc_per_node=2, nnodes=2, node_rank=1, rdzv_id="job7", rdzv_endpoint="n0:29400")
    assert distributed.launch_problems(agreeing, env) == []
    assert not distributed.needs_launch(agreeing, env)  # never launches again
    problems = distributed.launch_problems(config(nproc_per_node=4, nnodes=3, node_rank=0, rdzv_id="other",
                                                        rdzv_endpoint="n0:29400"), env)
    assert len(problems) == 4
    assert "started by a launcher (torchrun) with 2 process(es) per node" in problems[0]
    assert "the running launch has 2 node(s)" in problems[1]


def test_launch_plans():
    assert distributed.needs_launch(config(nproc_per_node=2), {})
    assert not distributed.needs_launch(config(nproc_per_node=1), {})
    assert not distributed.needs_launch(config(nproc_per_node="auto"), {}, gpu_count=0)  # CPU: one process
    assert distributed.needs_launch(config(nproc_per_node="gpu"), {}, gpu_count=4)
    with pytest.raises(ConfigError, match="nproc_per_node='gpu': this machine has no visible CUDA GPU"):
        distributed.needs_launch(config(nproc_per_node="gpu"), {}, gpu_count=0)
    local = distributed.make_launch_plan(config(nproc_per_node="auto"), gpu_count=8)
    assert (local.nproc_per_node, local.rdzv_backend, local.rdzv_endpoint) == (8, "c10d", "localhost:0")
    numbered = distributed.make_launch_plan(config(nnodes=4, node_rank=2, nproc_per_node=8, rdzv_endpoint="n0:1234"), 8)
    assert (numbered.rdzv_backend, numbered.rdzv_endpoint, numbered.node_rank, numbered.world_size) == ("static", "n0:1234", 2, 32)
    arrival = distributed.make_launch_plan(config(nnodes=2, nproc_per_node=1, rdzv_endpoint="n0", rdzv_id=5), 0)
    assert (arrival.rdzv_backend, arrival.rdzv_endpoint, arrival.run_id) == ("c10d", "n0:29400", "5")
    with pytest.raises(ConfigError, match=r"nproc_per_node=4: this node has 2 visible GPU\(s\), one per process; "
                                          r"valid values: \[1, 2\], 'auto' or 'gpu'"):
        distributed.make_launch_plan(config(nproc_per_node=4), gpu_count=2)
    assert distributed.make_launch_plan(config(nproc_per_node=4), gpu_count=0).nproc_per_node == 4  # CPU processes
    master = distributed.make_launch_plan(config(nnodes=2, node_rank=1, nproc_per_node=2, master_addr="n0"), 2)
    assert (master.rdzv_backend, master.rdzv_endpoint) == ("static", "n0:29500")


def test_a_resumed_multi_node_run_may_meet_elsewhere_but_not_change_its_processes(tmp_path):
    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    (folder / "trainer_state.json").write_text("{}")
    saved = config(nnodes=2, node_rank=0, nproc_per_node=2, rdzv_endpoint="n0:29400")
    checkpoints.mark_complete(folder, 2, saved.to_dict(), "fp")
    point = find_resume(tmp_path, True)
    other_node = config(nnodes=2, node_rank=1, nproc_per_node=2, rdzv_endpoint="n1:29401", rdzv_id="again")
    assert point.config_problems(other_node.to_dict()) == []
    (problem,) = point.config_problems(dataclasses.replace(other_node, nproc_per_node=4).to_dict())
    assert "nproc_per_node: 2 in the checkpoint, 4 now" in problem


def test_a_batch_that_cannot_be_split_fails_before_any_process_starts(tmp_path):
    from training_hub import lora_sft

    start = time.time()
    with pytest.raises(ConfigError, match=r"effective_batch_size=6 is not divisible by the 4 processes"):
        lora_sft("org/model", "d.jsonl", str(tmp_path / "out"), nproc_per_node=2, nnodes=2, node_rank=0,
                 rdzv_endpoint="127.0.0.1:1", effective_batch_size=6)
    assert time.time() - start < 30 and not (tmp_path / "out").exists()


class _Unpicklable:
    def __init__(self):
        self.hook = lambda: None

    def on_log(self, *args, **kwargs):
        pass


def test_callbacks_the_workers_cannot_receive_are_named(tmp_path):
    class Local:
        def on_log(self, *args, **kwargs):
            pass

    with pytest.raises(ConfigError) as info:
        distributed.pickle_callbacks([Local(), _Unpicklable()])
    text = str(info.value)
    assert "callbacks[0]=test_callbacks_the_workers_cannot_receive_are_named.<locals>.Local is defined inside a function" in text
    assert "callbacks[1]=_Unpicklable cannot be sent to the worker processes" in text


def test_in_memory_data_travels_as_a_jsonl_file(tmp_path):
    rows = [{"text": "hello"}, {"text": "world"}]
    spec = json.loads(distributed.write_worker_spec(config(data_path=rows), tmp_path).read_text())
    path = Path(spec["config"]["data_path"])
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows
    assert spec["config"]["ckpt_output_dir"] == "out" and spec["callbacks"] is None
    with pytest.raises(ConfigError, match="data_path=set: worker processes read data from a file"):
        distributed.write_rows({1, 2}, tmp_path / "x.jsonl", "data_path")


def test_the_error_names_the_rank_that_caused_the_failure_not_one_that_lost_its_peer(tmp_path):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    lost_peer = tmp_path / "error0.json"
    lost_peer.write_text(json.dumps({"message": {"message": "RuntimeError: [pair.cc:537] Read error [127.0.0.1]:1: "
                                                            "Connection reset by peer. GLHF!",
                                                 "extraInfo": {"py_callstack": "Traceback ...", "timestamp": "100"}}}))
    failures = {0: ProcessFailure(local_rank=0, pid=10, exitcode=1, error_file=str(lost_peer)),
                1: ProcessFailure(local_rank=1, pid=11, exitcode=-9, error_file=str(tmp_path / "none.json"))}
    error = distributed._worker_error(ChildFailedError("worker", failures), tmp_path)
    first, second, logs = str(error).splitlines()
    assert isinstance(error, distributed.WorkerFailed)
    assert first == "rank 1 (local rank 1) failed: killed by SIGKILL"  # although rank 0's error is dated earlier
    assert second.startswith("then rank 0 failed: RuntimeError: [pair.cc:537]") and "Traceback" not in str(error)
    assert logs == f"(every rank's output is in {tmp_path / 'logs'})"


def test_optimizer_state_loads_with_an_indexed_cpu_location(tmp_path):
    """transformers resumes a multi-process run's optimizer with map_location=args.device ('cpu:0' on the CPU)."""
    import torch

    torch.save({"exp_avg": torch.ones(3)}, tmp_path / "optimizer.pt")
    distributed.allow_indexed_cpu_map_location()
    distributed.allow_indexed_cpu_map_location()  # registered once
    loaded = torch.load(tmp_path / "optimizer.pt", map_location="cpu:0", weights_only=True)
    assert torch.equal(loaded["exp_avg"], torch.ones(3))


H200S = dict(device="cuda", gpu_name="H200", bf16_supported=True, total_memory_gib=141, free_memory_gib=140,
             bitsandbytes_installed=True, flex_attention_usable=True)


def test_model_splitting_spreads_layers_over_the_gpus_of_one_process_and_is_refused_elsewhere():
    from training_hub.hardware import Hardware
    from training_hub.models.common import device_map
    from training_hub.plan import make_plan

    four_gpus = Hardware(gpu_count=4, **H200S)
    plan = make_plan(config(enable_model_splitting=True), four_gpus, "peft", None)
    assert plan.model_splitting == "balanced" and device_map(plan) == "balanced"
    assert any("model split over 4 GPUs" in note for note in plan.notes)
    assert device_map(make_plan(config(), four_gpus, "peft", None)) == {"": 0}
    for hw, world, fragment in [(Hardware(device="cpu"), 1, "on the CPU: there is nothing to split over"),
                                (dataclasses.replace(four_gpus, gpu_count=1), 1, "with 1 visible GPU: nothing to split"),
                                (Hardware(device="cpu"), 2, "accelerate 1.15 turns FSDP on only for GPU processes")]:
        with pytest.raises(ConfigError, match=fragment):
            make_plan(config(enable_model_splitting=True), hw, "peft", None, world)
    with pytest.raises(ConfigError) as info:
        config(enable_model_splitting=True, backend="unsloth", nproc_per_node=2)
    assert "Unsloth's kernels and patches assume the whole model on one GPU" in str(info.value)


@pytest.mark.parametrize("world, launched, gpus, quantization, route", [
    (1, False, 4, None, "balanced"),  # one plain process: the layers spread over its GPUs
    (2, True, 2, None, "fsdp2"),  # torchrun / lora_sft's own workers: FSDP2 sharding
    (1, True, 1, None, "fsdp2"),  # torchrun --nproc-per-node 1: the same route, over one process
    (8, True, 8, "4bit", "fsdp2"),
    (2, True, 0, None, "CPU processes"),
    (1, True, 0, None, "CPU processes"),
    (2, True, 2, "8bit", "int8 tensors that FSDP2 cannot shard"),
    (1, False, 1, None, "with 1 visible GPU"),
])
def test_which_model_splitting_route_runs(world, launched, gpus, quantization, route):
    from training_hub.hardware import Hardware

    hw = Hardware(gpu_count=gpus, **H200S) if gpus else Hardware(device="cpu")
    if route in ("balanced", "fsdp2"):
        assert distributed.resolve_model_splitting(True, hw, world, launched, quantization)[0] == route
    else:
        with pytest.raises(ConfigError, match=route):
            distributed.resolve_model_splitting(True, hw, world, launched, quantization)
    assert distributed.resolve_model_splitting(False, hw, world, launched, quantization) == (None, [])


def test_the_fsdp2_plan_and_its_training_arguments():
    from training_hub.hardware import Hardware
    from training_hub.models.common import device_map, quantization_config
    from training_hub.plan import ModelShape, make_plan
    from training_hub.training import build_sft_config, fsdp_settings

    shape = ModelShape(hidden_size=8192, intermediate_size=28672, num_layers=80, vocab_size=128256,
                       num_parameters=70_553_706_496)
    eight = Hardware(gpu_count=8, **H200S)
    settings = config(enable_model_splitting=True, backend="peft", gradient_checkpointing=True)
    plan = make_plan(settings, eight, "peft", shape, 8, launched=True)
    assert (plan.model_splitting, plan.optim, plan.attn_implementation) == ("fsdp2", "adamw_torch", "sdpa")
    notes = " ".join(plan.notes)
    assert "each GPU holds 1/8 of the base weights, of the LoRA weights and of their optimizer state" in notes
    assert "Unsloth patches its own kernels onto one whole model per GPU" in notes
    assert "each process loads the base into CPU RAM" in notes and device_map(plan) == {"": "cpu"}
    # a 70B base does not fit one H200 in 16 bits (the estimate fits no sequence): sharded over 8 it leaves room
    auto = dict(backend="peft", micro_batch_size="auto", gradient_checkpointing=True)
    assert make_plan(config(**auto), eight, "peft", shape, 8).micro_batch_size == 1
    assert make_plan(config(**auto, enable_model_splitting=True), eight, "peft", shape, 8, launched=True).micro_batch_size > 4

    on_cpu_args = dataclasses.replace(plan, device="cpu", dtype="float32")  # TrainingArguments built on this machine
    args = build_sft_config(settings, on_cpu_args, "out", layer_classes=["LlamaDecoderLayer"])
    assert args.fsdp and args.fsdp_plugin_args == {
        "fsdp_version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "transformer_cls_names_to_wrap": "LlamaDecoderLayer",
        "cpu_ram_efficient_loading": False, "state_dict_type": "FULL_STATE_DICT", "activation_checkpointing": True,
        "reshard_after_forward": True}
    assert not args.gradient_checkpointing  # FSDP's activation checkpointing instead (Trainer refuses both)
    with pytest.raises(ValueError, match="names no decoder layer class"):
        fsdp_settings([], False)

    qlora = make_plan(config(enable_model_splitting=True, load_in_4bit=True), eight, "peft", shape, 8, launched=True)
    assert any("4-bit weights stored as bfloat16 (bnb_4bit_quant_storage)" in note for note in qlora.notes)
    assert device_map(qlora, quantized=True) == {"": 0}  # bitsandbytes quantizes on the GPU
    assert quantization_config(config(load_in_4bit=True), "bfloat16", sharded=True).bnb_4bit_quant_storage == torch_bf16()
    with pytest.raises(ConfigError, match="optim='paged_adamw_8bit' with enable_model_splitting under a launch"):
        make_plan(config(enable_model_splitting=True, optim="paged_adamw_8bit"), eight, "peft", shape, 8, launched=True)
    single = make_plan(config(enable_model_splitting=True), Hardware(gpu_count=1, **H200S), "peft", shape, 1, launched=True)
    assert any("FSDP2 over one process: the one shard is the whole model, so it saves no memory" in n for n in single.notes)


def torch_bf16():
    import torch

    return torch.bfloat16


def test_a_launch_that_would_shard_on_the_cpu_is_refused_before_any_process_starts():
    for settings, fragment in [(config(enable_model_splitting=True, nproc_per_node=2), "with CPU processes"),
                               (config(enable_model_splitting=True, nnodes=2, nproc_per_node=1, rdzv_endpoint="n0:1"),
                                "accelerate 1.15 turns FSDP on only for GPU processes")]:
        with pytest.raises(ConfigError, match=fragment):
            distributed.make_launch_plan(settings, gpu_count=0)
    with pytest.raises(ConfigError, match="load_in_8bit=True under a launch"):
        distributed.make_launch_plan(config(enable_model_splitting=True, load_in_8bit=True, nproc_per_node=2), 2)
    assert distributed.make_launch_plan(config(enable_model_splitting=True, nproc_per_node=2), 2).world_size == 2


def test_model_splitting_on_the_cpu_fails_before_a_model_loads(tiny_model_factory, greeting_jsonl, tmp_path):
    from training_hub import lora_sft

    with pytest.raises(ConfigError, match="enable_model_splitting=True on the CPU"):
        lora_sft(str(tiny_model_factory("qwen2", "chatml")), str(greeting_jsonl), str(tmp_path / "out"),
                 enable_model_splitting=True, data_output_dir="none")
    assert not (tmp_path / "out").exists()


# ---- end to end: workers started by lora_sft ------------------------------------------------------------------

def remove_launch_logs(error: str) -> None:
    """A failed launch keeps its logs folder (named on the error's last line); the tests clean it up."""
    folder = Path(error.splitlines()[-1].removeprefix("(every rank's output is in ").removesuffix(")"))
    assert folder.name == "logs" and folder.is_dir(), error
    shutil.rmtree(folder.parent)


def run_job(**kwargs) -> tuple[subprocess.CompletedProcess, dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(JOB), json.dumps(kwargs)], capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT_S, env=env)
    return proc, json.loads(proc.stdout.strip().splitlines()[-1])


def alive(pid_file: Path) -> list[int]:
    pids = [int(p) for p in pid_file.read_text().split()]
    still = []
    for pid in pids:
        try:
            os.kill(pid, 0)
            still.append(pid)
        except ProcessLookupError:
            pass
    return still


def step_losses(out: Path) -> list[tuple[int, float]]:
    rows = metric_rows(out)
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def settings(tiny_model_factory, greeting_jsonl) -> dict:
    # dropout and accumulation on purpose: an exact resume needs every rank's RNG and the sampler position back
    return dict(model_path=str(tiny_model_factory("qwen2", "chatml")), data_path=str(greeting_jsonl), backend="peft",
                nproc_per_node=2, lora_r=4, lora_dropout=0.1, max_steps=8, save_steps=3, save_total_limit=2,
                effective_batch_size=4, micro_batch_size=1, learning_rate=5e-3, warmup_steps=2, num_epochs=1,
                data_output_dir="none")


@pytest.mark.slow
def test_self_launch_trains_once_and_kill_then_resume_equals_the_whole_run(settings, tmp_path):
    from safetensors.torch import load_file

    whole, killed, pids = tmp_path / "whole", tmp_path / "killed", tmp_path / "pids"
    proc, summary = run_job(**settings, ckpt_output_dir=str(whole), _pid_file=str(pids), _in_memory=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert summary["plan"]["world_size"] == 2 and summary["plan"]["gradient_accumulation_steps"] == 2
    assert len(pids.read_text().split()) == 2 and proc.stdout.count('"metrics"') == 1  # the script ran once
    assert [s for s, _ in step_losses(whole)] == list(range(1, 9))  # written by rank 0 alone
    assert summary["metrics"]["global_step"] == 8 and summary["loaded_model"] == "PeftModelForCausalLM"
    assert summary["handlers_restored"]  # Ctrl-C raises KeyboardInterrupt again after the call

    pids.unlink()
    proc, summary = run_job(**settings, ckpt_output_dir=str(killed), _pid_file=str(pids),
                            _fail={"rank": 1, "step": 3, "kill": True})
    assert proc.returncode == 1 and summary["error_type"] == "WorkerFailed"
    assert summary["error"].startswith("rank 1 (local rank 1) failed: killed by SIGKILL")
    remove_launch_logs(summary["error"])
    assert alive(pids) == [] and not (killed / "adapter_model.safetensors").exists()

    proc, summary = run_job(**settings, ckpt_output_dir=str(killed), resume_from_checkpoint=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resuming from" in proc.stderr and "checkpoint-3" in proc.stderr
    assert step_losses(killed) == step_losses(whole)
    a, b = load_file(whole / "adapter_model.safetensors"), load_file(killed / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] - b[k]).abs().max() <= 1e-6 for k in a)


@pytest.mark.slow
def test_a_rank_that_raises_ends_every_worker_with_its_message(settings, tmp_path):
    out, pids = tmp_path / "out", tmp_path / "pids"
    proc, summary = run_job(**settings, ckpt_output_dir=str(out), _pid_file=str(pids), _fail={"rank": 1, "step": 2})
    assert proc.returncode == 1 and summary["error_type"] == "WorkerFailed"
    first_line = summary["error"].splitlines()[0]
    assert first_line == "rank 1 (local rank 1) failed: ValueError: rank 1 broke on purpose at step 2"
    assert "Traceback" not in summary["error"] and "every rank's output is in" in summary["error"]
    assert alive(pids) == [] and len(pids.read_text().split()) == 2 and summary["handlers_restored"]
    remove_launch_logs(summary["error"])
    assert max(s for s, _ in step_losses(out)) <= 2  # stopped there, not after the whole run


@pytest.mark.slow
def test_two_nodes_on_one_host_train_as_world_size_two(settings, tmp_path):
    out = tmp_path / "out"
    args = dict(settings, nproc_per_node=1, nnodes=2, rdzv_endpoint=f"127.0.0.1:{free_port()}", max_steps=4,
                save_steps=1000, ckpt_output_dir=str(out))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    nodes = [subprocess.Popen([sys.executable, str(JOB), json.dumps(dict(args, node_rank=i))], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in (0, 1)]
    try:
        outputs = [node.communicate(timeout=LAUNCH_TIMEOUT_S) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    first, second = (json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outputs)
    assert first["plan"]["world_size"] == 2 and first["metrics"]["global_step"] == 4
    assert second["metrics"] == {} and second["output_dir"] == str(out)  # rank 0 ran on the other node
    assert [s for s, _ in step_losses(out)] == [1, 2, 3, 4]


@pytest.mark.slow
def test_sigterm_to_the_caller_reaches_the_workers_which_save_and_stop(settings, tmp_path):
    out = tmp_path / "out"
    args = dict(settings, max_steps=100000, save_steps=100000, ckpt_output_dir=str(out))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, str(JOB), json.dumps(args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    metrics, deadline = out / "training_metrics.jsonl", time.time() + LAUNCH_TIMEOUT_S
    while time.time() < deadline and proc.poll() is None and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    try:
        stdout, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["error_type"] == "TrainingStopped" and "Training stopped by SIGTERM" in summary["error"]
    remove_launch_logs(summary["error"])
    (saved,) = out.glob("checkpoint-*")
    assert checkpoints.is_complete(saved) and (saved / "rng_state_0.pth").exists() and (saved / "rng_state_1.pth").exists()


@pytest.mark.slow
def test_two_ranks_tokenize_once_and_gather_a_sharded_adapter_whole(tiny_model_factory, greeting_jsonl, tmp_path):
    """Two gloo processes of one node (tests/two_rank_job.py). The local main process tokenizes, the other reads its
    cache. A tiny PEFT model sharded with fully_shard: each rank holds about half of the frozen base, and the adapter
    gathered on rank 0 is a normal PEFT adapter equal to the unsharded one. The canary: accelerate still gives CPU
    processes plain DDP for an FSDP plugin; when that fails, the CPU refusal of model splitting can go."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = tiny_model_factory("qwen2", "chatml")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(JOB.with_name("two_rank_job.py")), str(base), str(greeting_jsonl), str(tmp_path)],
                          capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = sorted((json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"rank"')),
                   key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1]
    assert [r["tokenized_from_cache"] for r in ranks] == [False, True]
    assert len(list((tmp_path / "cache").iterdir())) == 1
    assert ranks[0]["layers"] == ["Qwen2DecoderLayer"]
    assert all(0.4 < r["frozen_share"] < 0.6 for r in ranks), [r["frozen_share"] for r in ranks]
    assert ranks[0]["gathered_equal"] and ranks[1]["gathered_keys"] == 0  # gathered on rank 0's CPU only
    assert [r["accelerate_cpu_fsdp"] for r in ranks] == [False, False], ranks[0]["accelerate_cpu_distributed_type"]

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), tmp_path / "adapter")
    loaded = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert loaded.keys() == ranks[0]["lora"].keys()
    assert all(torch.equal(loaded[k], torch.tensor(v)) for k, v in ranks[0]["lora"].items())
