"""Run one lora_sft job in a fresh process and print a JSON summary on the last line.

End-to-end tests call this through subprocess because `import unsloth` patches the whole process
(TrainingArguments, SFTTrainer): a plain-PEFT run must never share a process with an Unsloth run.
Usage: python tests/e2e_job.py '{"model_path": ..., "data_path": ..., "ckpt_output_dir": ..., ...}'

Test-only keys (popped before lora_sft is called; each becomes a callback):
    "_kill_after_save_step": k   SIGKILL this process right after checkpoint-k is saved (and marked complete).
    "_kill_in_phase": name       with _kill_after_save_step: only in that phase of a two-phase run ("pre_lora":
                                 the trainer writing into ckpt_output_dir/pre_lora, "lora": the other one).
    "_nan_from_step": k          make the loss NaN from optimizer step k on (an output hook on the embeddings).
    "_zero_input_from_step": k   multiply the embeddings' output by 0 from step k on: with a bias-free architecture
                                 (llama) every LoRA gradient is then exactly 0.
"""

import json
import os
import signal
import sys


def test_callbacks(kwargs: dict) -> list:
    kill_step = kwargs.pop("_kill_after_save_step", None)
    kill_phase = kwargs.pop("_kill_in_phase", None)
    nan_step = kwargs.pop("_nan_from_step", None)
    zero_step = kwargs.pop("_zero_input_from_step", None)
    if kill_step is None and nan_step is None and zero_step is None:
        return []
    if kwargs.get("backend") != "peft":  # Unsloth must be imported before transformers
        from training_hub.models.unsloth import import_unsloth

        import_unsloth()
    from transformers import TrainerCallback

    callbacks = []
    if kill_step is not None:
        class KillAfterSave(TrainerCallback):
            def on_save(self, args, state, control, **kw):
                phase = "pre_lora" if os.path.basename(os.path.normpath(args.output_dir)) == "pre_lora" else "lora"
                if state.global_step == kill_step and kill_phase in (None, phase):
                    os.kill(os.getpid(), signal.SIGKILL)

        callbacks.append(KillAfterSave())
    class ScaleEmbeddingsFromStep(TrainerCallback):
        def __init__(self, step: int, factor: float):
            self.step, self.factor, self.hooked = step, factor, False

        def on_step_begin(self, args, state, control, model=None, **kw):
            if state.global_step + 1 >= self.step and not self.hooked:
                model.get_input_embeddings().register_forward_hook(lambda m, i, out: out * self.factor)
                self.hooked = True

    callbacks += [ScaleEmbeddingsFromStep(step, factor)
                  for step, factor in ((nan_step, float("nan")), (zero_step, 0.0)) if step is not None]
    return callbacks


def main() -> None:
    kwargs = json.loads(sys.argv[1])
    import training_hub

    extra = test_callbacks(kwargs)
    if extra:
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), *extra]
    result = training_hub.lora_sft(**kwargs)
    print(json.dumps({"metrics": result.metrics, "plan": result.plan, "data_summary": result.data_summary,
                      "unsloth_imported": "unsloth" in sys.modules}))


if __name__ == "__main__":
    main()
