"""Kill a cellstage training run for real: a child process, SIGKILL in the middle of an epoch.

``kill_mid_epoch(target, args, kwargs, pause_epoch=k, ...)`` starts ``python tests/killed_run.py
spec.json`` which calls ``target(*args, **kwargs)`` (e.g. ``cellstage.train.cv:run_fold``). In the
child, the first training batch of epoch ``k`` (0-based) is followed by a pause: a marker file is
written and the child sleeps. By then the checkpoints of epochs 0..k-1 have been written and the
in-memory state has moved past the last of them. The parent waits for the marker and sends
SIGKILL — no Python cleanup, no ``finally`` blocks, exactly what a walltime kill or ``kill -9``
does. The pause only makes the moment of the kill deterministic; nothing in cellstage knows
about it.

``capture_final_states(monkeypatch)`` records a clone of the LightningModule's ``state_dict`` at the
end of every ``Trainer.fit`` in this process (for comparing final weights that a trainer does
not write to disk, e.g. fine-tuning's last-epoch weights).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve()


def _jsonable(obj):
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    return obj


def kill_mid_epoch(target: str, args=(), kwargs=None, *, pause_epoch: int, workdir, threads: int,
                   arrays: dict | None = None, timeout: float = 240.0) -> dict:
    """Run ``target`` in a child, SIGKILL it during epoch ``pause_epoch``; returns what happened.

    ``arrays``: keyword arguments passed as numpy arrays (saved to ``.npy`` for the child).
    """
    import numpy as np

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    marker = workdir / "paused.json"
    marker.unlink(missing_ok=True)
    npy = {}
    for name, arr in (arrays or {}).items():
        npy[name] = str(workdir / f"{name}.npy")
        np.save(npy[name], arr)
    spec = {"target": target, "args": _jsonable(list(args)), "kwargs": _jsonable(dict(kwargs or {})),
            "arrays": npy, "threads": int(threads), "pause_epoch": int(pause_epoch), "marker": str(marker)}
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps(spec))
    log_path = workdir / "child.log"
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(HERE), str(spec_path)], stdout=log, stderr=subprocess.STDOUT)
    try:
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(f"child ended (rc {proc.returncode}) before epoch {pause_epoch}:\n"
                                     + log_path.read_text()[-4000:])
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"child did not reach epoch {pause_epoch} in {timeout} s:\n"
                                     + log_path.read_text()[-4000:])
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        rc = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return {"returncode": rc, "paused": json.loads(marker.read_text()), "seconds": time.monotonic() - t0}


def capture_final_states(monkeypatch) -> list:
    """A list that receives ``{name: tensor}`` of the trained module after every fit in this process."""
    import lightning as L

    states: list = []
    original = L.Callback.on_train_end

    from cellstage.training import resume

    def on_train_end(self, trainer, pl_module):
        states.append({k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()})
        return original(self, trainer, pl_module)

    monkeypatch.setattr(resume.EpochCheckpoint, "on_train_end", on_train_end, raising=False)
    return states


def assert_same_tensors(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:5]}"


def _child(spec_path: str) -> None:
    import importlib

    import numpy as np
    import torch

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    from cellstage.training import resume

    pause_epoch, marker = spec["pause_epoch"], Path(spec["marker"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == pause_epoch and batch_idx == 0:
            done = resume.read_sidecar(self.path).get("epochs_done")
            tmp = marker.with_name(marker.name + ".tmp")
            tmp.write_text(json.dumps({"epoch": pause_epoch, "epochs_done_on_disk": done, "pid": os.getpid()}))
            os.replace(tmp, marker)
            time.sleep(3600)  # killed here

    resume.EpochCheckpoint.on_train_batch_end = on_train_batch_end
    module, name = spec["target"].split(":")
    fn = getattr(importlib.import_module(module), name)
    kwargs = dict(spec["kwargs"])
    for key, path in spec["arrays"].items():
        kwargs[key] = np.load(path)
    fn(*spec["args"], **kwargs)
    raise SystemExit(f"training finished without reaching epoch {pause_epoch}")


if __name__ == "__main__":
    _child(sys.argv[1])
