"""``set-kernels train``: the SET-MLP of the SET authors' tutorial on Fashion-MNIST.

Protocol (the defaults): a 784-1000-1000-1000-10 MLP, ReLU, dropout 0.2 after each hidden layer,
batch 40, cross-entropy; every layer gets the Erdos-Renyi density ``epsilon * (n_in + n_out) /
(n_in * n_out)`` with epsilon = 13 (a layer where that is >= 1, the 1000-10 output layer, is a
dense ``nn.Linear``); weights He-uniform ``U(-sqrt(6 / fan_in), sqrt(6 / fan_in))`` on live entries,
with ``fan_in = density * n_in`` for sparse layers (``--init dense-fan-in``: ``n_in``, as in the
first experiment runs),
biases 0; SGD with momentum 0.9 and weight decay 2e-4, lr 0.05 for sparse models and 0.001 for
dense (Adam: lr 0.001); one SET update (zeta = 0.3, random regrowth, magnitude pruning; ``--prune set``:
the SET paper's sign split) at the end of every epoch except the last, after that epoch's evaluation.

Modes: ``set`` (evolving topology), ``static`` (the same initial topology, never evolved),
``dense`` (plain ``nn.Linear`` layers). Layers: ``sparse`` (:class:`SparseLinear` with
``block_size=1``: element sparsity, the paper's semantics, stored and computed truly sparse),
``masked`` (:class:`MaskedLinear`: the same semantics on a dense weight times a mask) or ``block``
(:class:`SparseLinear` with ``--block-size``). ``--hidden`` sets the hidden widths (default
``1000,1000,1000``) and ``--batch`` the batch size (default 40).

Input: pixels scaled to [0, 1] and standardised per pixel (see :func:`set_kernels.data.prepare`).
Reported train accuracy is the running accuracy over the epoch's mini-batches (dropout on); test
accuracy is measured on the whole test subset in eval mode.

From Python, ``run(TrainConfig(mode="static", epochs=10))`` returns the dict that ``--json`` writes;
flag ``--x-y`` is the :class:`TrainConfig` field ``x_y`` (docs/api.md).
"""
from __future__ import annotations

import dataclasses
import json
import math
import sys
import time

SIZES = (784, 1000, 1000, 1000, 10)
BATCH = 40
DROPOUT = 0.2
MOMENTUM = 0.9
WEIGHT_DECAY = 2e-4
LAYERS = ("masked", "sparse", "block")
INITS = ("sparse-fan-in", "dense-fan-in")
PRUNES = ("magnitude", "set")


def _is(v, kind) -> bool:
    return isinstance(v, kind) and not isinstance(v, bool)


AT_LEAST_1 = ("an int >= 1", lambda v: _is(v, int) and v >= 1)
POSITIVE = ("a positive number", lambda v: _is(v, (int, float)) and 0 < v < math.inf)


def _widths(text: str) -> tuple[int, ...]:
    """``"1000,1000,1000"`` -> ``(1000, 1000, 1000)`` (TrainConfig checks that each is >= 1)."""
    import argparse

    try:
        return tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def _flag(default, help=None, check=None, **argparse_kwargs):
    """A :class:`TrainConfig` field: default, flag help, argparse keywords, ``(expected, predicate)``."""
    return dataclasses.field(default=default, metadata=dict(argparse_kwargs, help=help, check=check))


@dataclasses.dataclass
class TrainConfig:
    """One ``set-kernels train`` run; field ``x_y`` is flag ``--x-y`` (the flags are made from the
    fields). Checked when built: a bad value raises ``ValueError`` naming the field. A field whose
    default is None may be None."""

    data: str | None = _flag(None, "data set (default: Fashion-MNIST when its files are found, else synthetic)",
                             choices=("fashion-mnist", "synthetic"))
    data_dir: str | None = _flag(None, "directory of the four Fashion-MNIST IDX files (.gz or plain); default: "
                                       "the dataset-fashion-mnist package's files")
    epochs: int = _flag(400, "training epochs (default 400, the protocol)", AT_LEAST_1, type=int)
    train_samples: int = _flag(2000, "training samples (default 2000)", AT_LEAST_1, type=int)
    test_samples: int = _flag(1000, "test samples (default 1000)", AT_LEAST_1, type=int)
    seed: int = _flag(0, "seed of the initial weights, topology, shuffling, dropout and SET",
                      ("an int", lambda v: _is(v, int)), type=int)
    mode: str = _flag("set", choices=("set", "static", "dense"))
    layer: str = _flag("masked", "sparse: element sparsity stored sparse (SparseLinear, block_size=1); masked: "
                                 "element sparsity as a dense weight times a mask (MaskedLinear); block: "
                                 "SparseLinear with --block-size", choices=LAYERS)
    hidden: tuple[int, ...] = _flag(SIZES[1:-1], "hidden widths, comma-separated (default 1000,1000,1000)",
                                    ("a tuple of widths >= 1", lambda v: isinstance(v, tuple)
                                     and all(AT_LEAST_1[1](w) for w in v)), type=_widths)
    batch: int = _flag(BATCH, f"batch size (default {BATCH})", AT_LEAST_1, type=int)
    block_size: int = _flag(16, "block size of --layer block", type=int, choices=(16, 32, 64, 128))
    epsilon: float = _flag(13.0, "Erdos-Renyi sparsity parameter (default 13)", POSITIVE, type=float)
    zeta: float = _flag(0.3, "fraction of connections rewired per epoch",
                        ("a value in [0, 1]", lambda v: _is(v, (int, float)) and 0 <= v <= 1), type=float)
    optimizer: str = _flag("sgd", "sgd: momentum 0.9, weight decay 2e-4; adam: MaskedAdam, weight decay 2e-4",
                           choices=("sgd", "adam"))
    lr: float | None = _flag(None, "learning rate (default: sgd 0.05 sparse, 0.001 dense; adam 0.001)", POSITIVE,
                             type=float)
    json: str | None = _flag(None, "write the configuration and full history to this file")
    init: str = _flag("sparse-fan-in", "He-uniform fan-in of sparse layers: live inputs per output (default) or "
                                       "all n_in", choices=INITS)
    threads: int | None = _flag(None, "torch CPU threads (default: torch's)", AT_LEAST_1, type=int)
    prune: str = _flag("magnitude", "SET pruning rule: magnitude (the smallest |w|, default) or set (the sign split: "
                                    "the smallest positive and the largest negative weights, half each)",
                       choices=PRUNES)

    def __post_init__(self):
        from .data import N_TEST, N_TRAIN

        self.hidden = tuple(self.hidden) if isinstance(self.hidden, list) else self.hidden
        for f in dataclasses.fields(self):
            value, choices, check = getattr(self, f.name), f.metadata.get("choices"), f.metadata["check"]
            if value is None and f.default is None:
                continue
            if choices is not None and value not in choices:
                raise ValueError(f"{f.name}: expected one of {choices}, got {value!r}")
            if check is not None and not check[1](value):
                raise ValueError(f"{f.name}: expected {check[0]}, got {value!r}")
        for name, most in (("train_samples", N_TRAIN), ("test_samples", N_TEST)):
            if getattr(self, name) > most:
                raise ValueError(f"{name}: at most {most} (the Fashion-MNIST size), got {getattr(self, name)}")

    @classmethod
    def from_args(cls, args) -> TrainConfig:
        """The config of parsed ``set-kernels train`` flags; the ``ValueError`` names the flag."""
        try:
            return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
        except ValueError as exc:
            name, _, rest = str(exc).partition(":")
            raise ValueError(f"--{name.replace('_', '-')}:{rest}") from None


def add_arguments(parser) -> None:
    """Add the ``set-kernels train`` flags to ``parser``: one per :class:`TrainConfig` field."""
    for f in dataclasses.fields(TrainConfig):
        kwargs = {k: v for k, v in f.metadata.items() if k != "check"}
        parser.add_argument("--" + f.name.replace("_", "-"), default=f.default, **kwargs)


def default_lr(mode: str, optimizer: str) -> float:
    """The protocol's learning rate: SGD 0.05 sparse / 0.001 dense; Adam 0.001."""
    return 1e-3 if optimizer == "adam" or mode == "dense" else 0.05


def er_density(n_in: int, n_out: int, epsilon: float) -> float:
    """Erdos-Renyi density ``epsilon * (n_in + n_out) / (n_in * n_out)`` (may exceed 1)."""
    return epsilon * (n_in + n_out) / (n_in * n_out)


def model_sizes(hidden=SIZES[1:-1]) -> tuple[int, ...]:
    """Layer sizes ``(784, *hidden, 10)`` of the SET-MLP."""
    return (SIZES[0], *hidden, SIZES[-1])


def build_model(mode: str, layer: str, block_size: int, epsilon: float, seed: int, sizes=SIZES,
                init: str = "sparse-fan-in"):
    """The SET-MLP as a ``torch.nn.Sequential`` (a ``FusedSequential``, see
    :mod:`set_kernels.nn.dropout`; see the module docstring).

    ``init`` sets the He-uniform bound of a sparse layer: ``"sparse-fan-in"`` (default) uses the
    expected number of live inputs per output, ``density * n_in``, so activations keep their scale
    through the sparse layers; ``"dense-fan-in"`` uses ``n_in`` as a dense layer would, which
    shrinks each sparse layer's output by about ``sqrt(density)`` (the nets then start slowly:
    about 36% test accuracy after one epoch on 5,000 samples, against about 82%).
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if layer not in LAYERS:
        raise ValueError(f"layer must be one of {LAYERS}, got {layer!r}")
    import torch

    from .nn import MaskedLinear, SparseLinear
    from .nn.dropout import FusedSequential, ReLUDropout

    gen = torch.Generator().manual_seed(seed)
    modules = []
    for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        density = er_density(n_in, n_out, epsilon)
        sparse = not (mode == "dense" or density >= 1.0)
        limit = math.sqrt(6.0 / (density * n_in if (sparse and init == "sparse-fan-in") else n_in))
        with torch.no_grad():  # the layers' parameters still require grad
            if not sparse:
                lin = torch.nn.Linear(n_in, n_out)
                lin.weight.uniform_(-limit, limit, generator=gen)
            elif layer == "masked":
                lin = MaskedLinear(n_in, n_out, density=density, generator=gen)
                lin.weight.uniform_(-limit, limit, generator=gen).mul_(lin.mask)
            else:
                b = 1 if layer == "sparse" else block_size
                lin = SparseLinear(n_in, n_out, density=density, block_size=b, generator=gen)
                lin.values.uniform_(-limit, limit, generator=gen)
                if b > 1:
                    lin.values.masked_fill_(~lin.layout.entry_mask(), 0)
            lin.bias.zero_()
        modules.append(lin)
        if k < len(sizes) - 2:
            modules.append(ReLUDropout(DROPOUT))  # ReLU then dropout, one kernel
    # element-level sparse layers and their ReLU + dropout run as one op in training
    return FusedSequential(*modules)


def count_weights(model) -> tuple[int, int]:
    """``(live weights, dense-equivalent weights)`` over the linear layers (biases excluded)."""
    import torch

    from .nn import MaskedLinear, SparseLinear

    live = total = 0
    for m in model.modules():
        if isinstance(m, MaskedLinear):
            live += int(m.mask.sum())
            total += m.mask.numel()
        elif isinstance(m, SparseLinear):
            live += int(m.layout.entry_mask().sum())  # O(nnz), no (rows, cols) mask
            total += m.in_features * m.out_features
        elif isinstance(m, torch.nn.Linear):
            live += m.weight.numel()
            total += m.weight.numel()
    return live, total


def _load_data(config: TrainConfig):
    """``(source, directory, (x_train, y_train, x_test, y_test))`` as ``config.data`` / ``data_dir`` say."""
    from . import data

    source, directory = config.data, None
    if source in (None, "fashion-mnist"):
        directory = data.find_fashion_mnist(config.data_dir)
        if directory is None:
            where = config.data_dir or f"the {data.DEBIAN_PACKAGE} package ({data.STANDARD_DIR})"
            if source == "fashion-mnist" or config.data_dir is not None:
                raise FileNotFoundError(f"Fashion-MNIST IDX files not found in {where}")
            print(f"set-kernels train: Fashion-MNIST not found in {where}; using the built-in synthetic data set "
                  "(install dataset-fashion-mnist or pass --data-dir)", file=sys.stderr)
        source = "synthetic" if directory is None else "fashion-mnist"
    if source == "fashion-mnist":
        raw = data.load_fashion_mnist(directory)
    else:
        raw = data.synthetic(config.train_samples, config.test_samples, seed=1234)
    return source, directory, data.prepare(*raw, config.train_samples, config.test_samples)


def _build(config: TrainConfig, sizes, steps_per_epoch: int):
    """``(model, optimizer, SET or None, lr)`` of ``config``."""
    import torch

    from .evolution import SET
    from .optim import MaskedAdam

    torch.manual_seed(config.seed)
    model = build_model(config.mode, config.layer, config.block_size, config.epsilon, config.seed, sizes=sizes,
                        init=config.init)
    lr = config.lr if config.lr is not None else default_lr(config.mode, config.optimizer)
    if config.optimizer == "sgd":
        # fused: one kernel for all parameters (the per-tensor loop of the default implementation
        # measured 120 us a step for the SET-MLP's eight tensors on the 2-core CPU, fused 43 us)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, fused=True)
    else:
        opt = MaskedAdam(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    evo = None
    if config.mode == "set" and config.epochs > 1 and config.zeta > 0:
        # One update at the end of every epoch but the last (step (epochs - 1) * steps_per_epoch).
        evo = SET(model, opt, zeta=config.zeta, interval=steps_per_epoch, prune=config.prune,
                  end_step=(config.epochs - 1) * steps_per_epoch, seed=config.seed)
    return model, opt, evo, lr


def _peak_rss_mb() -> float | None:
    """Peak resident memory of this process so far, in MiB (None where ``resource`` is missing)."""
    try:
        import resource
    except ImportError:  # not on every platform
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def _eval_chunk(sizes) -> int:
    """Test samples per evaluation forward: at most ~2**24 activations of the widest layer."""
    return max(1, min(1000, (1 << 24) // max(sizes)))


def _accuracy(model, x, y, chunk: int = 1000) -> float:
    import torch

    was_training = model.training
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            correct += int((model(x[i:i + chunk]).argmax(-1) == y[i:i + chunk]).sum())
    model.train(was_training)
    return correct / len(x)


def _epoch(model, opt, evo, x_train, y_train, batch: int, order, evaluate) -> dict:
    """One epoch of steps in ``order``; ``evaluate()`` runs after the last optimizer step, before its SET update."""
    import torch

    model.train()
    t0 = time.perf_counter()
    n, steps = len(x_train), -(-len(x_train) // batch)
    changed = False
    # the epoch's order gathered once: each batch is then a contiguous view (two gathers a step
    # cost about 40 us, 2 % of a width-1000 sparse step)
    x_order, y_order = x_train[order], y_train[order]
    # The batches' losses and hit counts are kept in two tensors made before the first step and
    # read once, after the last: reading them every step (float() and int()) waited for the
    # step's kernels on a GPU and cost about 15 us of a 1.3 ms width-1000 sparse step on the CPU.
    # (Keeping each step's loss and logits tensors instead pinned small blocks among the freed
    # activations, and the heap of a `set-kernels train` process grew: 1.57 -> 2.23 GB at width
    # 100,000.)
    losses = torch.empty(steps, dtype=torch.float64, device=x_order.device)
    hits = torch.zeros((), dtype=torch.int64, device=x_order.device)
    # What opt.zero_grad(set_to_none=True) does, without its per-call wrappers (a decorator that
    # turns dynamo off and a profiler range): 77 against 8 us a step, 2-7 % of a sparse step at
    # widths 4,000 and 1,000.
    params = [p for group in opt.param_groups for p in group["params"]]
    for s in range(steps):
        xb, yb = x_order[s * batch:(s + 1) * batch], y_order[s * batch:(s + 1) * batch]
        logits = model(xb)
        loss = torch.nn.functional.cross_entropy(logits, yb)
        for p in params:
            p.grad = None
        loss.backward()
        opt.step()
        losses[s] = loss.detach()
        hits += (logits.detach().argmax(-1) == yb).sum()
        if s == steps - 1:
            t1 = time.perf_counter()
            test_acc = evaluate()
            eval_time = time.perf_counter() - t1
        if evo is not None:
            changed |= evo.step()
    # the same sums as step by step: the loss summed in step order in Python floats
    loss_sum = 0.0
    for s, value in enumerate(losses.tolist()):
        loss_sum += value * (min(n, (s + 1) * batch) - s * batch)
    correct = int(hits)
    train_time = time.perf_counter() - t0 - eval_time  # training steps + evolution, without evaluation
    return {"train_loss": loss_sum / n, "train_acc": correct / n, "test_acc": test_acc, "time_s": train_time,
            "eval_time_s": eval_time, "evolved": bool(changed)}


def _fit(config: TrainConfig, model, opt, evo, x_train, y_train, evaluate) -> list[dict]:
    """``config.epochs`` epochs (the order of each drawn from the seed + 1 stream); the history."""
    import torch
    from tqdm import tqdm

    shuffle = torch.Generator().manual_seed(config.seed + 1)
    history = []
    bar = tqdm(range(1, config.epochs + 1), desc="train", unit="epoch", file=sys.stderr, mininterval=1.0,
               dynamic_ncols=True)
    for epoch in bar:
        order = torch.randperm(len(x_train), generator=shuffle)
        row = {"epoch": epoch, **_epoch(model, opt, evo, x_train, y_train, config.batch, order, evaluate)}
        history.append(row)
        bar.set_postfix(train_acc=f"{row['train_acc']:.4f}", test_acc=f"{row['test_acc']:.4f}")
        tqdm.write(f"epoch {epoch}/{config.epochs} loss={row['train_loss']:.4f} train_acc={row['train_acc']:.4f} "
                   f"test_acc={row['test_acc']:.4f} time={row['time_s']:.2f}s", file=sys.stdout)
    bar.close()
    return history


def run(config: TrainConfig, *, log=print) -> dict:
    """Train as ``config`` says; returns the result dict (also written to ``config.json`` when set):
    ``{"config": ..., "history": [one dict per epoch], "final": ...}`` (keys: docs/api.md)."""
    import torch

    if not isinstance(config, TrainConfig):
        raise TypeError(f"config: expected a TrainConfig, got {type(config).__name__}")
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    # With --init dense-fan-in the sparse nets start with tiny activations (~3% of the fan-in live):
    # subnormal floats would slow the CPU several-fold. Flushing them changes no reported figure.
    torch.set_flush_denormal(True)
    try:
        source, directory, (x_train, y_train, x_test, y_test) = _load_data(config)
        sizes, batch, n = model_sizes(config.hidden), config.batch, len(x_train)
        model, opt, evo, lr = _build(config, sizes, -(-n // batch))
        live, total = count_weights(model)
        settings = dict(dataclasses.asdict(config), lr=lr, data=source, data_dir=directory,
                        sizes=list(sizes), dropout=DROPOUT, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                        live_weights=live, dense_weights=total, threads=torch.get_num_threads(),
                        torch=torch.__version__)
        log(f"set-kernels train: {source} ({n} train / {len(x_test)} test), mode={config.mode} layer={config.layer}"
            f"{' block=' + str(config.block_size) if config.layer == 'block' and config.mode != 'dense' else ''} "
            f"sizes={'-'.join(map(str, sizes))} batch={batch} "
            f"{'prune=' + config.prune + ' ' if evo is not None else ''}"
            f"optimizer={config.optimizer} lr={lr} epochs={config.epochs} seed={config.seed}; "
            f"{live}/{total} weights live ({live / total:.4f})")
        history = _fit(config, model, opt, evo, x_train, y_train,
                       lambda: _accuracy(model, x_test, y_test, chunk=_eval_chunk(sizes)))
    finally:
        torch.set_flush_denormal(False)
    times = [h["time_s"] for h in history]
    result = {"config": settings, "history": history, "final": {
        "test_acc": history[-1]["test_acc"], "train_acc": history[-1]["train_acc"],
        "best_test_acc": max(h["test_acc"] for h in history),
        "time_per_epoch_s": sum(times) / len(times), "total_time_s": sum(times) + sum(h["eval_time_s"] for h in history),
        "live_weights": count_weights(model)[0], "peak_rss_mb": _peak_rss_mb()}}
    if config.json:
        with open(config.json, "w") as f:
            json.dump(result, f, indent=1)
    log(f"final: test_acc={result['final']['test_acc']:.4f} train_acc={result['final']['train_acc']:.4f} "
        f"best_test_acc={result['final']['best_test_acc']:.4f} time_per_epoch={result['final']['time_per_epoch_s']:.3f}s")
    return result
