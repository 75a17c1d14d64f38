"""`lqmf train`, `lqmf tune` and `lqmf learn`: from one resolved config to one registered adapter.

- run.py: the training use case (`train`, `TrainingRun`): checks, dry run, launch, registration.
- recipe.py: `Recipe`, one run's setup, step loop with out-of-memory recovery, evaluation, checkpoints.
- loop.py: the steps a recipe is made of: data preparation, model setup, forward/backward, saving.
- memory.py: memory readings and the budget that picks the micro-batch.
- offload.py: activation offload to pinned host memory, and kept layers (not recomputed in backward).
- distributed.py: the multi-GPU launcher and what the ranks exchange; fsdp.py: FSDP-QLoRA.
- tune.py: the Optuna study over training configs.
- learn.py: `lqmf learn`, a new version of an adapter from its users' corrections; kto.py: the KTO loss.
"""
