"""Time one device training step in ONNX Runtime Training against the same step in PyTorch eager.

Like for like: the default `ModelConfig`, adapters (`*.lora_A`/`*.lora_B`) the only trainable
tensors, AdamW with ORT's hyperparameters on both sides, the same initial weights (the torch model
is loaded from the compiled bundle's checkpoint), the same batches, the same thread count. The two
runtimes run in alternating blocks of steps, so machine noise lands on both. The first-step losses
must agree (same weights, same batch) or the run fails.

Run from the repository root:  python bench/train_step.py [--steps 20 --rounds 10 --threads 2]
The last line of stdout is one JSON object with every figure.

Threads. `torch.set_num_threads(n)` sizes torch's intra-op (OpenMP) pool. For ORT Training what
counts is `SessionOptions.intra_op_num_threads`, passed to `onnxruntime.training.api.Module`
(`session_options=`); the `Optimizer` reuses the module's options. Each of the three sessions
(training, eval, optimizer) owns a pool of n-1 workers plus the calling thread: counting
/proc/self/task gives +2 threads for the Module and +1 for the Optimizer at n=2, none at n=1, +9
at n=4. Without options ORT uses one thread per physical core. OMP_NUM_THREADS does not change
ORT's pools (this onnxruntime-training wheel links no OpenMP); it only sizes torch's and
OpenBLAS's, and `import onnxruntime` loads torch here anyway (via onnxruntime.training.ortmodule).
Note that `agent/trainer.py`'s `OrtTrainer` stores its `threads` argument but passes no
SessionOptions, so on devices ORT currently runs with its default thread count; this bench builds
the Module itself, with the same calls as `OrtTrainer.train`, plus the options.

ORT's intra-op workers spin while waiting for work (`session.intra_op.allow_spinning`, default
on); `--ort-spin off` turns that off, which matters on a machine that is already busy.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

LR = 1e-2  # TrainConfig's default learning rate
# ORT's AdamW (onnxblock OptimType.AdamW defaults); torch's AdamW gets the same numbers.
BETAS = (0.9, 0.999)
EPS = 1e-6
WEIGHT_DECAY = 0.0
LOSS_TOLERANCE = 1e-4
N_BATCHES = 16  # distinct batches, cycled through by both sides in the same order
BUNDLE_VERSION = 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="steps per block, per side (default 20)")
    p.add_argument("--rounds", type=int, default=10, help="alternating blocks per side (default 10)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps per side first (default 10)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64, help="sequence length (<= ModelConfig.max_seq_len)")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads for both runtimes")
    p.add_argument(
        "--ort-spin",
        choices=("on", "off"),
        default="on",
        help="ORT intra-op worker spin-waiting (default on, ORT's own default)",
    )
    args = p.parse_args(argv)
    for name in ("steps", "rounds", "batch", "seq", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.warmup < 0:
        p.error("--warmup must be at least 0")
    return args


@contextlib.contextmanager
def quiet(log: Path) -> Iterator[None]:
    """Send fds 1 and 2 to `log` (ORT's C++ logs and deepspeed's import banner); replay it on error."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "wb") as fh:
        os.dup2(fh.fileno(), 1)
        os.dup2(fh.fileno(), 2)
    try:
        yield
    except BaseException:
        _restore(saved)
        sys.stderr.write(log.read_text(errors="replace")[-4000:])
        raise
    _restore(saved)


def _restore(saved: tuple[int, int]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(saved[0], 1)
    os.dup2(saved[1], 2)
    os.close(saved[0])
    os.close(saved[1])


def make_batches(vocab: int, batch: int, seq: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(N_BATCHES):
        stream = rng.integers(0, vocab, size=(batch, seq + 1), dtype=np.int64)
        out.append((np.ascontiguousarray(stream[:, :-1]), np.ascontiguousarray(stream[:, 1:])))
    return out


class OrtStep:
    """The device's step (as in `OrtTrainer.train`), with the Module built with thread options."""

    def __init__(self, bundle: Path, threads: int, spin: bool, batches: list[tuple[np.ndarray, np.ndarray]]):
        import onnxruntime

        from fednestd.agent.ort_training import training_api

        api = training_api()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        self._state = api.CheckpointState.load_checkpoint(str(bundle / "checkpoint"))
        self._module = api.Module(
            str(bundle / "training_model.onnx"),
            self._state,
            str(bundle / "eval_model.onnx"),
            device="cpu",
            session_options=options,
        )
        self._optimizer = api.Optimizer(str(bundle / "optimizer_model.onnx"), self._module)
        self._optimizer.set_learning_rate(LR)
        self._module.train()
        self._batches = [(x, y.reshape(-1)) for x, y in batches]
        self._i = 0

    def __call__(self) -> float:
        x, y = self._batches[self._i % len(self._batches)]
        self._i += 1
        loss = float(np.asarray(self._module(x, y)))
        self._optimizer.step()
        self._module.lazy_reset_grad()
        return loss


class EagerStep:
    """The same step in PyTorch eager: adapters trainable, everything else frozen."""

    def __init__(self, cfg: Any, initial: dict[str, np.ndarray], batches: list[tuple[np.ndarray, np.ndarray]]):
        import torch

        from fednestd.shared.model import build_model, load_partitions, partition_of

        self._torch = torch
        model = build_model(cfg)
        names = {n for n, _ in model.named_parameters()}
        if names != set(initial):
            raise RuntimeError(
                f"bundle checkpoint and model disagree on parameters: {sorted(names ^ set(initial))[:4]}"
            )
        load_partitions(model, {"all": initial})
        adapters = []
        for name, param in model.named_parameters():
            trainable = partition_of(name) == "adapters"
            param.requires_grad_(trainable)
            if trainable:
                adapters.append(param)
        model.train()
        self._model = model
        self._opt = torch.optim.AdamW(adapters, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
        self._batches = [(torch.from_numpy(x), torch.from_numpy(y)) for x, y in batches]
        self._i = 0

    def __call__(self) -> float:
        from fednestd.shared.model import lm_loss

        x, y = self._batches[self._i % len(self._batches)]
        self._i += 1
        self._opt.zero_grad(set_to_none=True)
        loss = lm_loss(self._model, x, y)
        loss.backward()
        self._opt.step()
        return float(loss.item())


def checkpoint_parameters(bundle: Path) -> dict[str, np.ndarray]:
    """Every parameter of the bundle (frozen and trainable), read from its own CheckpointState."""
    from fednestd.agent.ort_training import training_api

    state = training_api().CheckpointState.load_checkpoint(str(bundle / "checkpoint"))
    return {name: np.array(param.data, dtype=np.float32) for name, param in state.parameters}


def timed_block(step: Callable[[], float], n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter_ns()
        step()
        times.append((time.perf_counter_ns() - start) / 1e6)
    return times


def p90(xs: list[float]) -> float:
    return float(np.percentile(xs, 90))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)

    from fednestd.backend.compiler import compile_bundle
    from fednestd.shared.config import ModelConfig
    from fednestd.shared.crypto import generate_signing_key
    from fednestd.shared.model import build_model, partition_state

    cfg = ModelConfig()
    if args.seq > cfg.max_seq_len:
        raise SystemExit(f"--seq {args.seq} exceeds ModelConfig.max_seq_len ({cfg.max_seq_len})")
    batches = make_batches(cfg.vocab_size, args.batch, args.seq)

    with tempfile.TemporaryDirectory(prefix="fednestd-bench-") as tmp_name:
        tmp = Path(tmp_name)
        t0 = time.perf_counter()
        with quiet(tmp / "compile.log"):
            import onnxruntime

            key = generate_signing_key(tmp / "backend.key")
            bundle = compile_bundle(cfg, partition_state(build_model(cfg)), BUNDLE_VERSION, tmp / "bundles", key)
            onnxruntime.set_default_logger_severity(3)
            initial = checkpoint_parameters(bundle)
            ort_step = OrtStep(bundle, args.threads, args.ort_spin == "on", batches)
        compile_s = time.perf_counter() - t0
        eager_step = EagerStep(cfg, initial, batches)

        # Like for like: same weights and batch give the same loss; after one AdamW step on each
        # side the second loss shows the optimizers agree too (ORT's AdamW adds eps before bias
        # correction, torch after, so a small difference there is expected).
        ort_losses = [ort_step(), ort_step()]
        eager_losses = [eager_step(), eager_step()]
        first_diff = abs(ort_losses[0] - eager_losses[0])
        second_diff = abs(ort_losses[1] - eager_losses[1])
        if first_diff > LOSS_TOLERANCE:
            raise SystemExit(
                f"first-step losses differ by {first_diff:.2e} (ort {ort_losses[0]:.6f}, "
                f"eager {eager_losses[0]:.6f}): the two sides are not computing the same step"
            )

        timed_block(ort_step, args.warmup)
        timed_block(eager_step, args.warmup)
        ort_ms: list[float] = []
        eager_ms: list[float] = []
        round_ratios = []
        for r in range(args.rounds):
            order = [(ort_step, ort_ms), (eager_step, eager_ms)]
            if r % 2:
                order.reverse()  # neither side always runs right after the other
            block = {}
            for step, sink in order:
                times = timed_block(step, args.steps)
                sink.extend(times)
                block[step is ort_step] = statistics.median(times)
            round_ratios.append(block[True] / block[False])
        bundle_mb = sum(f.stat().st_size for f in bundle.iterdir()) / 2**20

    ort_med, eager_med = statistics.median(ort_ms), statistics.median(eager_ms)
    result = {
        "bench": "train_step",
        "ort_ms_median": round(ort_med, 3),
        "eager_ms_median": round(eager_med, 3),
        "ratio_ort_over_eager": round(ort_med / eager_med, 3),
        "ort_ms_p90": round(p90(ort_ms), 3),
        "eager_ms_p90": round(p90(eager_ms), 3),
        "ratio_p90_ort_over_eager": round(p90(ort_ms) / p90(eager_ms), 3),
        "ort_ms_min": round(min(ort_ms), 3),
        "eager_ms_min": round(min(eager_ms), 3),
        "round_ratio_min": round(min(round_ratios), 3),
        "round_ratio_max": round(max(round_ratios), 3),
        "first_loss_ort": round(ort_losses[0], 6),
        "first_loss_eager": round(eager_losses[0], 6),
        "first_loss_abs_diff": float(f"{first_diff:.3g}"),
        "second_loss_abs_diff": float(f"{second_diff:.3g}"),
        "batch": args.batch,
        "seq": args.seq,
        "threads": args.threads,
        "torch_threads_seen": torch.get_num_threads(),
        "ort_spin": args.ort_spin,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "optimizer": {"kind": "AdamW", "lr": LR, "betas": list(BETAS), "eps": EPS, "weight_decay": WEIGHT_DECAY},
        "compile_s": round(compile_s, 1),
        "bundle_mb": round(bundle_mb, 2),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "machine": platform.machine(),
    }
    print_table(result)
    print(json.dumps(result))
    return result


def print_table(r: dict[str, Any]) -> None:
    print(
        f"train step: batch {r['batch']} x seq {r['seq']}, {r['threads']} threads, "
        f"{r['rounds']} rounds x {r['steps_per_round']} steps per side after {r['warmup']} warm-up, interleaved"
    )
    print(f"{'':14}{'median ms':>11}{'p90 ms':>10}{'min ms':>10}")
    print(f"{'ORT training':14}{r['ort_ms_median']:>11.2f}{r['ort_ms_p90']:>10.2f}{r['ort_ms_min']:>10.2f}")
    print(f"{'torch eager':14}{r['eager_ms_median']:>11.2f}{r['eager_ms_p90']:>10.2f}{r['eager_ms_min']:>10.2f}")
    print(
        f"ratio ort/eager: median {r['ratio_ort_over_eager']:.2f}, p90 {r['ratio_p90_ort_over_eager']:.2f}, "
        f"per-round {r['round_ratio_min']:.2f}-{r['round_ratio_max']:.2f}"
    )
    print(
        f"first-step loss: ort {r['first_loss_ort']:.6f}, eager {r['first_loss_eager']:.6f}, "
        f"|diff| {r['first_loss_abs_diff']:.1e} (second step {r['second_loss_abs_diff']:.1e}); "
        f"load avg {r['load_avg_1m']} on {r['cpus']} cpus"
    )


if __name__ == "__main__":
    main()
