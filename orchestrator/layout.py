"""The names of what a job directory and its checkpoints hold, in one place: written by the supervisor, the
trainer and the engines; read by resume, `orch status`, sampling and export.

    runs/<job>/state.json  plan.json  spec.yaml  logs/  samples/
    runs/<job>/eval/step-N.json                   evaluations (orchestrator/jobs/evaluations.py)
    runs/<job>/checkpoints/latest                 the name of the newest complete checkpoint
    runs/<job>/checkpoints/step-N/trainer_state.json  ema.safetensors  model.safetensors (or the engine's own
                                  layout beside it)  spec.yaml  model_input.json
"""

# A job directory
JOB_STATE_FILE = "state.json"  # the job's record: status, attempts, checkpoint, MLflow run
PLAN_FILE = "plan.json"
EVAL_DIR = "eval"  # the job's evaluations, one JSON file per evaluated step
SPEC_FILE = "spec.yaml"  # also in every checkpoint: the spec it was trained under

# A checkpoint directory, under every strategy
LATEST_POINTER = "latest"  # in the checkpoints folder
TRAINER_STATE = "trainer_state.json"  # step, data position, schedule; its presence marks a complete checkpoint
EMA_FILE = "ema.safetensors"  # the EMA weights: what sampling and export use by default
MODEL_FILE = "model.safetensors"  # the raw (trained) weights; ZeRO and FSDP write them consolidated, in fp32
MODEL_INPUT_FILE = "model_input.json"  # what the network takes (orchestrator/components/model_input.py)


def checkpoint_name(step: int) -> str:
    """The directory of the checkpoint of `step` (zero-padded: names sort by step)."""
    return f"step-{step:07d}"
