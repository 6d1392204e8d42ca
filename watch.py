"""What stops a training run before its last step, apart from the loop itself.

- `DivergenceWatch`: after each step's loss and gradient norm, before the update, whether training diverged.
- `StopSignal`: Ctrl-C or SIGTERM asks for a stop after the current step (a checkpoint is written); a second one
  stops at once.
- `PeerWatch` / `start_processes`: under torchrun, a failing rank tells the others, so none waits in a collective
  until its 30-minute timeout.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
from datetime import timedelta

import torch


class DivergenceWatch:
    """Decides after each step's loss and gradient norm, before the update, whether training diverged.

    A step is abnormal when its loss or gradient norm is not finite, when its gradient is exactly
    zero (nothing can move any more; at loss ln(vocab) the model predicts every token alike, what an
    overflowed hidden state gives), or when its loss is above `factor` times the start (the mean of
    the first START_STEPS normal losses of the run). `check` returns the reason to stop, or None:
    at once for the first two, after `patience` abnormal steps in a row for the third.

    The loss of step s is computed with the weights after s - 1 updates, the ones checkpoint
    step-(s-1) holds; `suspect_from` is the first checkpoint step whose weights gave an abnormal loss
    in the current run of abnormal steps (None when the last step was normal).
    """

    START_STEPS = 10

    def __init__(self, factor: float, patience: int, vocab_size: int, state: dict | None = None):
        self.factor, self.patience, self.ln_vocab = factor, patience, math.log(vocab_size)
        state = state or {}
        self.start: list[float] = list(state.get("start", []))
        self.abnormal_since: int | None = state.get("abnormal_since")

    def state(self) -> dict:
        """What a checkpoint keeps, so that a resumed run judges divergence as the uninterrupted one."""
        return {"start": list(self.start), "abnormal_since": self.abnormal_since}

    @property
    def suspect_from(self) -> int | None:
        return None if self.abnormal_since is None else self.abnormal_since - 1

    def check(self, step: int, loss: float, grad_norm: float) -> str | None:
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        start = sum(self.start) / len(self.start) if self.start else None
        far = finite and bool(self.factor) and start is not None and loss > self.factor * start
        zero = finite and grad_norm == 0.0
        if finite and not far and not zero:
            self.abnormal_since = None
            if len(self.start) < self.START_STEPS:
                self.start.append(loss)
            return None
        if self.abnormal_since is None:
            self.abnormal_since = step
        if not finite:
            return f"the loss is {loss} (gradient norm {grad_norm})"
        if zero:
            uniform = abs(loss - self.ln_vocab) < 1e-3 * self.ln_vocab
            return (f"the gradient is exactly zero at loss {loss:.4f}" +
                    (f" = ln(vocab size) = {self.ln_vocab:.4f}: the model predicts every token alike (its hidden "
                     "state collapsed)" if uniform else ": nothing reaches the adapter any more"))
        run = step - self.abnormal_since + 1
        if run >= self.patience:
            return (f"the loss has been above {self.factor:g} x its start ({start:.4f}) for {run} steps in a row "
                    f"(now {loss:.6g}; --diverge-factor {self.factor:g}, --diverge-steps {self.patience})")
        return None


class StopSignal:
    """While entered, SIGINT and SIGTERM set `asked` (the loop finishes its step, checkpoints and exits 130); a second
    signal raises KeyboardInterrupt at once. The handlers before are put back on exit."""

    def __init__(self):
        self.asked = False
        self._before = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):   # not the main thread: no handler, no stop on a signal
                self._before[sig] = signal.signal(sig, self._ask)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._before.items():
            signal.signal(sig, handler)
        self._before.clear()

    def _ask(self, signum, frame) -> None:
        if self.asked:
            raise KeyboardInterrupt
        self.asked = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step and writing a checkpoint "
              "(again to stop now)", file=sys.stderr, flush=True)


class PeerWatch:
    """Under torchrun, a rank that fails must not leave the others blocked in a collective until its timeout
    (30 minutes). A failing rank writes why into the rendezvous store (a key of this run's), and a thread
    in every rank looks once a second: when a peer has failed, or the store itself is gone (the process
    holding it died), it prints one line and ends its process with exit code 1."""

    def __init__(self, rank: int):
        self.rank, self.done = rank, threading.Event()
        self.key = f"slm-ec/failed/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', 0)}"
        self.store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                                                is_master=False, timeout=timedelta(seconds=30))
        threading.Thread(target=self._watch, daemon=True, name="peer-watch").start()

    def _watch(self) -> None:
        while not self.done.wait(1.0):
            try:
                if self.store.check([self.key]):
                    self._stop(self.store.get(self.key).decode(errors="replace"))
            except Exception as e:   # the store's host died
                self._stop(f"the rendezvous store cannot be reached ({type(e).__name__}): a peer process has died")

    def _stop(self, why: str) -> None:
        print(f"train.py: error: rank {self.rank} stops because {why}", file=sys.stderr, flush=True)
        os._exit(1)

    def failed(self, error: BaseException) -> None:
        """This rank is failing (error: fail()'s SystemExit, or any exception). When a peer failed first, the
        error is the collective breaking under this rank: one line naming the peer instead. Else tell the peers.
        A stop asked for (exit code 130: every rank checkpoints and stops) is no failure."""
        if isinstance(error, SystemExit) and error.code in (0, None, 130):
            return
        self.done.set()
        text = f"exit code {error.code}" if isinstance(error, SystemExit) else f"{type(error).__name__}: {error}"
        with contextlib.suppress(Exception):
            if self.store.check([self.key]):
                self._stop(self.store.get(self.key).decode(errors="replace"))
            self.store.set(self.key, f"rank {self.rank} failed ({text})")

    def close(self) -> None:
        self.done.set()


def start_processes(world: int, device) -> PeerWatch | None:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK and the rendezvous; a plain `python train.py` is one rank."""
    if world == 1:
        return None
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             timeout=timedelta(minutes=30))
    return PeerWatch(torch.distributed.get_rank())
