"""Checkpoints on disk, below `training/` and `hf/`, which both read and write them.

- `dist_checkpoint`: megatron dist checkpoints (atomic saves, `latest` markers, pruning, locks).
- `safe_load`: checks a checkpoint's files before anything is unpickled.
- `optimizer_fixes`: the torch-Adam fixes megatron's optimizer needs to save and load.
- `run_config`: the versioned JSON run configuration each checkpoint stores, and its reader.
"""
