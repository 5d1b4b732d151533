"""Checkpoints are plain dicts of tensors and builtins, saved atomically, loaded weights_only."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pipeline.errors import PipelineError
from pipeline.io import atomic_torch_save


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    return atomic_torch_save(path, state)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with ``weights_only=True`` (no pickled code runs), with a clear error if unusable."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"checkpoint {path} does not exist; train that fold first")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise PipelineError(f"checkpoint {path} could not be loaded ({type(exc).__name__}: {exc}); "
                            "delete it and train again") from None


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """RNG states of Python, numpy, torch and this process's GPU, in a weights_only-loadable form.

    Only the GPU this rank uses is saved: each DDP rank saves its own state (``rng_ranks``), and a
    list of every visible GPU's state would not fit a machine with fewer GPUs.
    """
    import random

    import numpy as np

    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[2] if random.getstate()[2] is not None else -1],
        "python_version": random.getstate()[0],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype("int64")), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        cuda = device if device is not None and device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
        state["cuda"] = torch.cuda.get_rng_state(cuda)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Restore :func:`rng_state`'s output; the CUDA state goes to ``device`` (this rank's GPU).

    Older checkpoints hold a list of every GPU's state: the one of this rank's GPU is taken when it
    exists, else the first.
    """
    import random

    import numpy as np

    py = list(state["python"])
    gauss = py.pop()
    random.setstate((state["python_version"], tuple(int(v) for v in py), None if gauss == -1 else gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype("uint32"), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is None or not torch.cuda.is_available() or device is None or device.type != "cuda":
        return
    if isinstance(cuda, (list, tuple)):
        if not cuda:
            return
        index = device.index or 0
        cuda = cuda[index] if index < len(cuda) else cuda[0]
    torch.cuda.set_rng_state(cuda.cpu(), device)
