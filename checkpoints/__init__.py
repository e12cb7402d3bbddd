"""Checkpoint readers and writers: HF safetensors in, Orbax out (`moejax.checkpoints`)."""
