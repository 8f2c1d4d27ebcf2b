"""Checkpoints of train.py runs: atomic writes, checked reads, and the random-number state a run
resumes bitwise from.

A checkpoint is a dict: 'method', 'config' (every setting of config.parse_args), 'model' (the state dict
of the unwrapped network), 'optimizer', 'iteration', 'best', 'best_iteration', 'rng' (rng_state of every
process), 'metrics' and 'checksum' (evaluate.checkpoint_checksum, which every reader verifies). best.pt
holds the same without 'optimizer' and 'rng' (save_best). evaluate.read_checkpoint reads both.
"""
import json
import os
import random
from pathlib import Path

import numpy as np
import torch

import evaluate


def rng_state():
    """Every random generator a step can touch (torch CPU and CUDA: dropout; numpy and `random`:
    nothing of ours today, but a user's augmentation might), as tensors and plain values that
    torch.load(weights_only=True) accepts: numpy's key array is stored as an int64 tensor."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": random.getstate()}


def set_rng_state(state):
    """Undo rng_state: a resumed run draws the same dropout masks as the uninterrupted one."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_best(out, obj, final):
    """A new best validation: best.pt gets its weights, without the optimizer state and RNG states
    (a third of the size; nothing resumes from a best). When the best is the run's last validation,
    ckpt.pt already holds it: best.pt is removed rather than kept as a copy."""
    if final:
        (Path(out) / "best.pt").unlink(missing_ok=True)
        return
    save_checkpoint(Path(out) / "best.pt", {k: v for k, v in obj.items() if k not in ("optimizer", "rng")})


def save_checkpoint(path, obj):
    """Atomic: write a temporary file in the same folder, flush it to disk, then rename over the
    target. A run killed at any moment leaves either the old checkpoint or the new one, never half
    of one (os.replace is atomic on POSIX and Windows). The dict gets a 'checksum' of its tensors
    (evaluate.checkpoint_checksum), which every reader verifies. A failed write (disk full, quota,
    permissions) removes the temporary file and stops with one line; the old checkpoint stays."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    obj["checksum"] = evaluate.checkpoint_checksum(obj)
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:  # torch.save reports a full disk as a RuntimeError
        tmp.unlink(missing_ok=True)
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        raise SystemExit(f"could not write the checkpoint {path} ({reason}); the temporary file is removed and "
                         f"{'the previous checkpoint is intact' if path.exists() else 'no checkpoint exists yet'}. "
                         "Free disk space (or choose another --out) and continue with --resume") from None


def truncate_log(path, iteration):
    """On --resume: drop the records of log.jsonl after the checkpoint's `iteration` (the run repeats
    those iterations, bitwise), so that the log reads as if the run had never stopped. Atomic."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines(keepends=True)
            if line.strip() and json.loads(line).get("iteration", 0) <= iteration]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def read_checkpoint(path):
    """evaluate.read_checkpoint, its errors as one-line exits."""
    try:
        return evaluate.read_checkpoint(path)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(str(error)) from None
