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
"""
from __future__ import annotations

import json
import math
import sys
import time

SIZES = (784, 1000, 1000, 1000, 10)
BATCH = 40
DROPOUT = 0.2
MOMENTUM = 0.9
WEIGHT_DECAY = 2e-4


def add_arguments(parser) -> None:
    """Add the fixed ``set-kernels train`` flags to ``parser``."""
    parser.add_argument("--data", choices=("fashion-mnist", "synthetic"), default=None,
                        help="data set (default: Fashion-MNIST when its files are found, else synthetic)")
    parser.add_argument("--data-dir", default=None,
                        help="directory of the four Fashion-MNIST IDX files (.gz or plain); default: the "
                             "dataset-fashion-mnist package's files")
    parser.add_argument("--epochs", type=int, default=400, help="training epochs (default 400, the protocol)")
    parser.add_argument("--train-samples", type=int, default=2000, help="training samples (default 2000)")
    parser.add_argument("--test-samples", type=int, default=1000, help="test samples (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights, topology, shuffling, "
                                                            "dropout and SET")
    parser.add_argument("--mode", choices=("set", "static", "dense"), default="set")
    parser.add_argument("--layer", choices=LAYERS, default="masked",
                        help="sparse: element sparsity stored sparse (SparseLinear, block_size=1); masked: "
                             "element sparsity as a dense weight times a mask (MaskedLinear); block: SparseLinear "
                             "with --block-size")
    parser.add_argument("--hidden", type=_widths, default=SIZES[1:-1],
                        help="hidden widths, comma-separated (default 1000,1000,1000)")
    parser.add_argument("--batch", type=int, default=BATCH, help=f"batch size (default {BATCH})")
    parser.add_argument("--block-size", type=int, default=16, choices=(16, 32, 64, 128),
                        help="block size of --layer block")
    parser.add_argument("--epsilon", type=float, default=13.0, help="Erdos-Renyi sparsity parameter (default 13)")
    parser.add_argument("--zeta", type=float, default=0.3, help="fraction of connections rewired per epoch")
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd",
                        help="sgd: momentum 0.9, weight decay 2e-4; adam: MaskedAdam, weight decay 2e-4")
    parser.add_argument("--lr", type=float, default=None,
                        help="learning rate (default: sgd 0.05 sparse, 0.001 dense; adam 0.001)")
    parser.add_argument("--json", default=None, help="write the configuration and full history to this file")
    parser.add_argument("--init", choices=INITS, default="sparse-fan-in",
                        help="He-uniform fan-in of sparse layers: live inputs per output (default) or all n_in")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--prune", choices=PRUNES, default="magnitude",
                        help="SET pruning rule: magnitude (the smallest |w|, default) or set (the sign split: "
                             "the smallest positive and the largest negative weights, half each)")


def _check_args(args) -> str | None:
    if args.epochs < 1:
        return f"--epochs: expected an int >= 1, got {args.epochs}"
    for name in ("train_samples", "test_samples"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')}: expected an int >= 1, got {getattr(args, name)}"
    if not (args.epsilon > 0) or math.isinf(args.epsilon):
        return f"--epsilon: expected a positive number, got {args.epsilon}"
    if not (0.0 <= args.zeta <= 1.0):
        return f"--zeta: expected a value in [0, 1], got {args.zeta}"
    if args.lr is not None and not (args.lr > 0) or (args.lr is not None and math.isinf(args.lr)):
        return f"--lr: expected a positive number, got {args.lr}"
    if getattr(args, "batch", BATCH) < 1:
        return f"--batch: expected an int >= 1, got {args.batch}"
    if args.threads is not None and args.threads < 1:
        return f"--threads: expected an int >= 1, got {args.threads}"
    return None


def default_lr(mode: str, optimizer: str) -> float:
    """The protocol's learning rate: SGD 0.05 sparse / 0.001 dense; Adam 0.001."""
    if optimizer == "adam":
        return 1e-3
    return 1e-3 if mode == "dense" else 0.05


def er_density(n_in: int, n_out: int, epsilon: float) -> float:
    """Erdos-Renyi density ``epsilon * (n_in + n_out) / (n_in * n_out)`` (may exceed 1)."""
    return epsilon * (n_in + n_out) / (n_in * n_out)


INITS = ("sparse-fan-in", "dense-fan-in")
LAYERS = ("masked", "sparse", "block")


def _widths(text: str) -> tuple[int, ...]:
    """``"1000,1000,1000"`` -> ``(1000, 1000, 1000)``; each width an int >= 1."""
    import argparse

    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"expected widths >= 1, got {text!r}")
    return widths


def model_sizes(hidden=SIZES[1:-1]) -> tuple[int, ...]:
    """Layer sizes ``(784, *hidden, 10)`` of the SET-MLP."""
    return (SIZES[0], *hidden, SIZES[-1])
PRUNES = ("magnitude", "set")


def build_model(mode: str, layer: str, block_size: int, epsilon: float, seed: int, sizes=SIZES,
                init: str = "sparse-fan-in"):
    """The SET-MLP as a ``torch.nn.Sequential`` (see the module docstring).

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
    from .nn.dropout import Dropout

    gen = torch.Generator().manual_seed(seed)
    modules = []
    for k, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        density = er_density(n_in, n_out, epsilon)
        sparse = not (mode == "dense" or density >= 1.0)
        fan_in = density * n_in if (sparse and init == "sparse-fan-in") else n_in
        limit = math.sqrt(6.0 / fan_in)
        if mode == "dense" or density >= 1.0:
            lin = torch.nn.Linear(n_in, n_out)
            with torch.no_grad():
                lin.weight.uniform_(-limit, limit, generator=gen)
        elif layer == "masked":
            lin = MaskedLinear(n_in, n_out, density=density, generator=gen)
            with torch.no_grad():
                lin.weight.uniform_(-limit, limit, generator=gen).mul_(lin.mask)
        else:
            b = 1 if layer == "sparse" else block_size
            lin = SparseLinear(n_in, n_out, density=density, block_size=b, generator=gen)
            with torch.no_grad():
                lin.values.uniform_(-limit, limit, generator=gen)
                if b > 1:
                    lin.values.masked_fill_(~lin.layout.entry_mask(), 0)
        with torch.no_grad():
            lin.bias.zero_()
        modules.append(lin)
        if k < len(sizes) - 2:
            modules += [torch.nn.ReLU(), Dropout(DROPOUT)]
    return torch.nn.Sequential(*modules)


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


def _load_data(args):
    from . import data

    if args.train_samples > data.N_TRAIN or args.test_samples > data.N_TEST:
        raise ValueError(f"--train-samples / --test-samples: at most {data.N_TRAIN} / {data.N_TEST} "
                         f"(the Fashion-MNIST sizes), got {args.train_samples} / {args.test_samples}")
    source = args.data
    directory = None
    if source in (None, "fashion-mnist"):
        directory = data.find_fashion_mnist(args.data_dir)
        if directory is None:
            where = args.data_dir or f"the {data.DEBIAN_PACKAGE} package ({data.STANDARD_DIR})"
            if source == "fashion-mnist" or args.data_dir is not None:
                raise FileNotFoundError(f"Fashion-MNIST IDX files not found in {where}")
            print(f"set-kernels train: Fashion-MNIST not found in {where}; using the built-in synthetic data set "
                  "(install dataset-fashion-mnist or pass --data-dir)", file=sys.stderr)
            source = "synthetic"
        else:
            source = "fashion-mnist"
    if source == "fashion-mnist":
        raw = data.load_fashion_mnist(directory)
    else:
        raw = data.synthetic(args.train_samples, args.test_samples, seed=1234)
    return source, directory, data.prepare(*raw, args.train_samples, args.test_samples)


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


def run(args, *, log=print) -> dict:
    """Train as ``args`` say; returns the result dict (also written to ``--json``)."""
    import torch
    from tqdm import tqdm

    from .evolution import SET
    from .optim import MaskedAdam

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # With --init dense-fan-in the sparse nets start with tiny activations (~3% of the fan-in live):
    # subnormal floats would slow the CPU several-fold. Flushing them changes no reported figure.
    torch.set_flush_denormal(True)
    try:
        return _run(args, log)
    finally:
        torch.set_flush_denormal(False)


def _run(args, log) -> dict:
    import torch
    from tqdm import tqdm

    from .evolution import SET
    from .optim import MaskedAdam

    source, directory, (x_train, y_train, x_test, y_test) = _load_data(args)
    torch.manual_seed(args.seed)
    sizes = model_sizes(getattr(args, "hidden", SIZES[1:-1]))
    batch = getattr(args, "batch", BATCH)
    model = build_model(args.mode, args.layer, args.block_size, args.epsilon, args.seed, sizes=sizes,
                        init=getattr(args, "init", "sparse-fan-in"))
    lr = args.lr if args.lr is not None else default_lr(args.mode, args.optimizer)
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    else:
        opt = MaskedAdam(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    n = len(x_train)
    steps_per_epoch = -(-n // batch)
    evo = None
    prune = getattr(args, "prune", "magnitude")  # Namespaces built by hand may lack the later flags
    if args.mode == "set" and args.epochs > 1 and args.zeta > 0:
        # One update at the end of every epoch but the last (step (epochs - 1) * steps_per_epoch).
        evo = SET(model, opt, zeta=args.zeta, interval=steps_per_epoch, prune=prune,
                  end_step=(args.epochs - 1) * steps_per_epoch, seed=args.seed)
    live, total = count_weights(model)
    config = {k: v for k, v in vars(args).items() if k not in ("fn", "command")}
    config.update(lr=lr, data=source, data_dir=directory, sizes=list(sizes), batch=batch, dropout=DROPOUT,
                  momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, live_weights=live, dense_weights=total,
                  threads=torch.get_num_threads(), torch=torch.__version__)
    log(f"set-kernels train: {source} ({n} train / {len(x_test)} test), mode={args.mode} layer={args.layer}"
        f"{' block=' + str(args.block_size) if args.layer == 'block' and args.mode != 'dense' else ''} "
        f"sizes={'-'.join(map(str, sizes))} batch={batch} "
        f"{'prune=' + prune + ' ' if evo is not None else ''}"
        f"optimizer={args.optimizer} lr={lr} epochs={args.epochs} seed={args.seed}; "
        f"{live}/{total} weights live ({live / total:.4f})")
    shuffle = torch.Generator().manual_seed(args.seed + 1)
    history = []
    bar = tqdm(range(1, args.epochs + 1), desc="train", unit="epoch", file=sys.stderr, mininterval=1.0,
               dynamic_ncols=True)
    for epoch in bar:
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(n, generator=shuffle)
        loss_sum = 0.0
        correct = 0
        test_acc = None
        changed = False
        for s in range(steps_per_epoch):
            idx = order[s * batch:(s + 1) * batch]
            xb, yb = x_train[idx], y_train[idx]
            logits = model(xb)
            loss = torch.nn.functional.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(-1) == yb).sum())
            if s == steps_per_epoch - 1:
                t1 = time.perf_counter()
                test_acc = _accuracy(model, x_test, y_test, chunk=_eval_chunk(sizes))  # before this epoch's evolution, as the tutorial
                eval_time = time.perf_counter() - t1
            if evo is not None:
                changed |= evo.step()
        train_time = time.perf_counter() - t0 - eval_time  # training steps + evolution, without evaluation
        row = {"epoch": epoch, "train_loss": loss_sum / n, "train_acc": correct / n, "test_acc": test_acc,
               "time_s": train_time, "eval_time_s": eval_time, "evolved": bool(changed)}
        history.append(row)
        bar.set_postfix(train_acc=f"{row['train_acc']:.4f}", test_acc=f"{test_acc:.4f}")
        tqdm.write(f"epoch {epoch}/{args.epochs} loss={row['train_loss']:.4f} train_acc={row['train_acc']:.4f} "
                   f"test_acc={test_acc:.4f} time={train_time:.2f}s", file=sys.stdout)
    bar.close()
    times = [h["time_s"] for h in history]
    result = {"config": config, "history": history, "final": {
        "test_acc": history[-1]["test_acc"], "train_acc": history[-1]["train_acc"],
        "best_test_acc": max(h["test_acc"] for h in history),
        "time_per_epoch_s": sum(times) / len(times), "total_time_s": sum(times) + sum(h["eval_time_s"] for h in history),
        "live_weights": count_weights(model)[0], "peak_rss_mb": _peak_rss_mb()}}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    log(f"final: test_acc={result['final']['test_acc']:.4f} train_acc={result['final']['train_acc']:.4f} "
        f"best_test_acc={result['final']['best_test_acc']:.4f} time_per_epoch={result['final']['time_per_epoch_s']:.3f}s")
    return result


def main(args) -> int:
    error = _check_args(args)
    if error:
        print(f"set-kernels train: {error}", file=sys.stderr)
        return 2
    try:
        run(args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"set-kernels train: {exc}", file=sys.stderr)
        return 2
    return 0
