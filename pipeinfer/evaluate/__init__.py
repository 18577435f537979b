"""lm-evaluation-harness over the pipeline: the `pipeinfer` model of lm-eval (lm.py) and its launcher.

    python -m pipeinfer.evaluate --model_args config=exp_config.json,pipeline_size=1 --tasks hellaswag
    torchrun --nproc-per-node=2 -m pipeinfer.evaluate --model_args config=exp_config.json --tasks hellaswag

lm-eval is imported only by lm.py and the launcher: the rest of pipeinfer runs without it.
"""
