"""Training: ``fit`` runs epochs of mini-batches and passes each epoch's ``EpochMetrics`` to ``on_epoch``,
which returns True to stop the run (``fit`` knows nothing of Optuna or MLflow). Curvature probes
(``mixer.curvature``) run every ``curvature_every`` epochs, at the epoch the train loss stalls
(``curvature_on_plateau``) and at the last epoch (``curvature_at_end``)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from mixer.bundle import ModelBundle
from mixer.config import ConfigError, TrainConfig, load_run_config
from mixer.curvature import Curvature, escape_test, extreme_eigenvalues
from mixer.data import DataError, Dataset, load
from mixer.evaluate import EXIT_BROKEN_PIPE, prog_name, quiet_broken_pipe
from mixer.metrics import bce_with_logits, classification_metrics


@dataclass(frozen=True)
class EpochMetrics:
    """What one epoch measured (``epoch`` counts from 1). The curvature fields are None on epochs without
    a probe, ``escape_gain`` also when the negative curvature was not clear enough to try the escape
    step (``mixer.curvature.Escape.gain``: 1 when the loss fell as ``½ α² λ_min`` predicts).
    ``neg_curvature_ratio`` is ``|λ_min| / λ_max``, ``neg_curvature_share`` the spectral density's
    share below ``-eps``."""

    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    val_precision: float
    val_recall: float
    val_f1: float
    lr: float
    grad_norm_mean: float
    grad_norm_max: float
    update_ratio: float
    epoch_seconds: float
    hessian_max_eig: float | None = None
    hessian_min_eig: float | None = None
    neg_curvature_ratio: float | None = None
    curvature_seconds: float | None = None
    neg_curvature_share: float | None = None
    escape_gain: float | None = None
    lanczos_steps: int | None = None

    def as_dict(self) -> dict[str, float]:
        """Metric name -> value, leaving out what this epoch did not measure (no ``epoch``)."""
        return {k: float(v) for k, v in dataclasses.asdict(self).items() if k != "epoch" and v is not None}


@dataclass
class FitResult:
    """The outcome of ``fit``: one EpochMetrics per epoch run, in order, and how the run ended. ``status``
    is "completed", "stopped" (on_epoch asked) or "diverged" (a NaN or infinite loss), and ``reason`` says
    why it did not complete (else None). ``best_params`` are the parameters at the end of ``best_epoch``
    (lowest val_loss, 0 if none finished), ``params`` at the end of the run; with ``ema_decay`` both are
    the weights' moving average, which validation and probes measure. ``probes`` maps an epoch to its
    curvature probe; ``probe_batch`` is the rows ``(x, y)`` they used, or None."""

    history: list[EpochMetrics]
    status: str
    reason: str | None
    best_epoch: int
    best_params: dict[str, np.ndarray]
    params: dict[str, np.ndarray] = field(repr=False)
    probes: dict[int, Curvature] = field(default_factory=dict, repr=False)
    probe_batch: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)


OnEpoch = Callable[[EpochMetrics], "bool | None"]


def probe_size(config: TrainConfig, n_train: int) -> int:
    """Rows in the probe batch: ``curvature_batch``, but at most 2 % of the training rows (and >= 32)."""
    return min(config.curvature_batch, max(32, n_train // 50), n_train)


def _probe(params: dict[str, np.ndarray], batch: tuple[np.ndarray, np.ndarray], config: TrainConfig,
           seed: int, warm: Curvature | None) -> tuple[Curvature, dict[str, float]]:
    """One curvature probe and its EpochMetrics fields, with the escape test at clear negative curvature."""
    started = time.perf_counter()
    c = extreme_eigenvalues(params, *batch, config.model, iters=config.curvature_iters, seed=seed, dtype=None,
                            tol=config.curvature_tol, warm=warm, share_eps=config.curvature_share_eps)
    fields = {"hessian_max_eig": c.lambda_max, "hessian_min_eig": c.lambda_min,
              "neg_curvature_ratio": c.neg_ratio, "neg_curvature_share": c.neg_share,
              "lanczos_steps": c.iters}
    if c.lambda_min < 0 and c.neg_ratio >= config.curvature_escape_ratio:
        escape = escape_test(params, *batch, config.model, c.ritz.vector_min, c.lambda_min)
        fields["escape_gain"] = escape.gain
    fields["curvature_seconds"] = time.perf_counter() - started
    return c, fields


def fit(config: TrainConfig, data: Dataset, *, seed: int, on_epoch: OnEpoch | None = None) -> FitResult:
    """Train one Mixer; ``on_epoch`` gets each epoch's metrics and stops the run by returning True. Every
    random draw (init, shuffling, dropout, gradient noise, probe batch) derives from ``seed``: same seed
    and inputs give a bit-identical history. ValueError if ``data.n_features`` is not the model's."""
    from mixer.diagnosis import stalled
    from mixer.model import init_params, loss_and_grads, predict_logits
    from mixer.optim import Adam, ema_update, sam_gradients
    from mixer.schedules import learning_rate

    model = config.model
    if data.n_features != model.n_features:
        raise ValueError(f"the data has {data.n_features} features but the model expects "
                         f"n_features={model.n_features}")
    dtype = np.dtype(config.dtype)
    # Independent streams, so that e.g. turning dropout on does not change the shuffling order.
    init_ss, shuffle_ss, dropout_ss, noise_ss, probe_ss = np.random.SeedSequence(seed).spawn(5)
    shuffle_rng, dropout_rng = np.random.default_rng(shuffle_ss), np.random.default_rng(dropout_ss)
    params = init_params(model, int(init_ss.generate_state(1)[0]), dtype=dtype)
    optimizer = Adam.from_config(config, params, rng=np.random.default_rng(noise_ss))
    # What is scored, probed, kept and returned: the weights, or their moving average.
    scored = {k: v.copy() for k, v in params.items()} if config.ema_decay else params

    x_train, y_train, x_val = (np.ascontiguousarray(a, dtype=dtype)
                               for a in (data.x_train, data.y_train, data.x_val))
    y_val = np.asarray(data.y_val, dtype=np.float64)
    n, batch = len(x_train), config.batch_size
    every, on_plateau, at_end = config.curvature_every, config.curvature_on_plateau, config.curvature_at_end
    probe, probes = None, {}
    if every or on_plateau or at_end:
        rows = np.random.default_rng(probe_ss).choice(n, size=probe_size(config, n), replace=False)
        probe = (x_train[rows], y_train[rows])

    history: list[EpochMetrics] = []
    best_epoch, best_loss, best_params = 0, np.inf, {k: v.copy() for k, v in scored.items()}

    def result(status: str, reason: str | None = None) -> FitResult:
        return FitResult(history=history, status=status, reason=reason, best_epoch=best_epoch,
                         best_params=best_params, params=scored, probes=probes, probe_batch=probe)

    for epoch in range(1, config.epochs + 1):
        started = time.perf_counter()
        lr = learning_rate(config, epoch - 1)
        order = shuffle_rng.permutation(n)
        loss_sum, norms, ratios = 0.0, [], []
        for start in range(0, n, batch):
            rows = order[start:start + batch]
            # SAM's second pass replays the first one's dropout masks: the same function, moved.
            masks = dropout_rng.bit_generator.state if config.sam_rho else None
            loss, grads = loss_and_grads(params, x_train[rows], y_train[rows], model, train=True,
                                         rng=dropout_rng, label_smoothing=config.label_smoothing)
            if config.sam_rho and np.isfinite(loss):
                def perturbed(rows=rows, masks=masks):
                    dropout_rng.bit_generator.state = masks
                    return loss_and_grads(params, x_train[rows], y_train[rows], model, train=True,
                                          rng=dropout_rng, label_smoothing=config.label_smoothing)[1]
                grads = sam_gradients(params, grads, config.sam_rho, perturbed)
            if not np.isfinite(loss):
                return result("diverged", f"training loss is {loss} at epoch {epoch}, step {len(norms) + 1}")
            stats = optimizer.step(params, grads, lr=lr)
            if not np.isfinite(stats.grad_norm):
                return result("diverged", f"gradient norm is {stats.grad_norm} at epoch {epoch}")
            if config.ema_decay:
                ema_update(scored, params, config.ema_decay, optimizer.step_count)
            loss_sum += loss * len(rows)
            norms.append(stats.grad_norm)
            ratios.append(stats.update_ratio)
        logits = predict_logits(scored, x_val, model)
        val_loss = bce_with_logits(logits, y_val, pos_weight=model.pos_weight)
        if not np.isfinite(val_loss):
            return result("diverged", f"validation loss is {val_loss} at epoch {epoch}")
        scores = classification_metrics(logits, y_val)
        seconds = time.perf_counter() - started
        curvature = {}
        train_losses = [m.train_loss for m in history] + [loss_sum / n]
        if probe is not None and ((every and epoch % every == 0) or (at_end and epoch == config.epochs)
                                  or (on_plateau and stalled(train_losses))):
            warm = probes[max(probes)] if probes else None
            probes[epoch], curvature = _probe(scored, probe, config, seed, warm)
        metrics = EpochMetrics(epoch=epoch, train_loss=train_losses[-1], val_loss=val_loss,
                               val_accuracy=scores["accuracy"], val_precision=scores["precision"],
                               val_recall=scores["recall"], val_f1=scores["f1"], lr=float(lr),
                               grad_norm_mean=sum(norms) / len(norms), grad_norm_max=max(norms),
                               update_ratio=sum(ratios) / len(ratios), epoch_seconds=seconds, **curvature)
        history.append(metrics)
        if val_loss < best_loss:
            best_epoch, best_loss = epoch, val_loss
            best_params = {k: v.copy() for k, v in scored.items()}
        if on_epoch is not None and on_epoch(metrics):
            return result("stopped", f"stopped after epoch {epoch} of {config.epochs}")
    return result("completed")


def format_epoch(m: EpochMetrics, epochs: int) -> str:
    """One human-readable line for an epoch, as ``python -m mixer.train`` prints it."""
    line = (f"epoch {m.epoch:>{len(str(epochs))}}/{epochs}  train_loss {m.train_loss:.4f}  "
            f"val_loss {m.val_loss:.4f}  val_acc {m.val_accuracy:.4f}  val_f1 {m.val_f1:.4f}  "
            f"lr {m.lr:.2e}  grad {m.grad_norm_mean:.3f}/{m.grad_norm_max:.3f}  {m.epoch_seconds:.1f}s")
    if m.hessian_min_eig is not None:
        line += f"  eig [{m.hessian_min_eig:.3g}, {m.hessian_max_eig:.3g}]"
    return line


@quiet_broken_pipe
def main(argv: list[str] | None = None) -> int:
    """``python -m mixer.train CONFIG.yaml``: train one configuration, a line per epoch."""
    parser = argparse.ArgumentParser(
        prog=prog_name("mixer-train", "mixer.train"),
        description="Train one Mixer configuration and print a line per epoch: the way to "
                    "reproduce one trial of a sweep (its best_config.yaml) without the sweep.",
        epilog="Exit status: 0 done; 1 the run diverged; 2 bad usage, a bad config or data file, or a "
               f"--save path that cannot be written; 130 interrupted (Ctrl-C); {EXIT_BROKEN_PIPE} the "
               "reader of stdout closed it early (e.g. | head)",
    )
    parser.add_argument("config", help="run config YAML with keys data, train, seed "
                        "(e.g. configs/notebook_headline.yaml or a sweep's best_config.yaml)")
    parser.add_argument("--epochs", type=int, help="override train.epochs")
    parser.add_argument("--train-csv", metavar="CSV", help="train on this labelled CSV instead of the "
                        "file's data (see also $MIXER_DATA_DIR)")
    parser.add_argument("--seed", type=int, help="override the file's seed")
    parser.add_argument("--save", metavar="PATH",
                        help="write the best epoch's model (parameters + config + data pipeline) here")
    args = parser.parse_args(argv)

    try:
        data_config, config, seed = load_run_config(args.config, train_csv=args.train_csv)
        if args.epochs is not None:
            config = dataclasses.replace(config, epochs=args.epochs)
        data = load(data_config)
        config = config.for_features(data.n_features)
    except (ConfigError, DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    seed = args.seed if args.seed is not None else seed
    print(f"training on {len(data.x_train):,} rows, validating on {len(data.x_val):,} "
          f"({data.n_features} features, {config.model.n_tokens} tokens), seed {seed}", flush=True)
    try:
        result = fit(config, data, seed=seed,
                     on_epoch=lambda m: print(format_epoch(m, config.epochs), flush=True))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if result.status == "diverged":
        print(f"diverged: {result.reason}", file=sys.stderr)
        return 1
    best = result.history[result.best_epoch - 1]
    print(f"best epoch {best.epoch}: val_loss {best.val_loss:.4f}  val_acc {best.val_accuracy:.4f}  "
          f"val_f1 {best.val_f1:.4f}")
    if args.save:
        # The data config in the bundle lets mixer.evaluate/predict warn about rows of another kind.
        bundle = ModelBundle(result.best_params, config.model, data.pipeline,
                             info={"data_config": dataclasses.asdict(data_config)})
        try:
            path = bundle.save(args.save)
        except OSError as exc:
            print(f"error: {args.save}: cannot write: {exc.strerror or exc}", file=sys.stderr)
            return 2
        print(f"saved the best epoch's model to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
