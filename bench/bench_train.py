"""Training: this pipeline's default trainer against the original style (per-layer front-end run
on every batch, float32, default layout, conv1 + max-pool head), same data, same seed, same
starting weights, same number of epochs; equal accuracy is checked on the validation split."""

from __future__ import annotations

import time
from dataclasses import replace

import torch
from sklearn.metrics import f1_score

from bench.common import cli_main, print_table
from cwtops.core.config import TrainConfig
from cwtops.data.signals import load_signals, scan_raw, write_sample_dataset
from cwtops.data.weights import generate_filter_bank
from cwtops.model.network import HybridCWTNet, ModelArgs
from cwtops.model.reference import PerLayerFrontEnd
from tasks.train import training_layout

TARGET = 3.0


def _data(root, per_class: int, seed: int = 0):
    write_sample_dataset(root, seed=seed, counts={k: per_class for k in ("am", "burst", "chirp", "fm", "noise")})
    manifest = scan_raw(root)
    classes = sorted(manifest.label.unique())
    signals = torch.from_numpy(load_signals(manifest, root)).unsqueeze(1)
    labels = torch.tensor([classes.index(c) for c in manifest.label])
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    split = int(0.8 * len(order))
    return (signals[order[:split]], labels[order[:split]]), (signals[order[split:]], labels[order[split:]])


def _standardise(signal: torch.Tensor) -> torch.Tensor:
    centred = signal - signal.mean(dim=-1, keepdim=True)
    return centred / centred.square().mean(dim=-1, keepdim=True).add(1e-8).sqrt()


def _train(model: HybridCWTNet, features, train, val, epochs: int, batch: int = 32) -> tuple[float, float]:
    """features(signals) -> scalograms; returns (seconds, validation macro-F1)."""
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    signals, labels = train
    started = time.perf_counter()
    cache = features(signals) if features.__name__ == "cached" else None
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(epoch))
        for start in range(0, len(order), batch):
            picked = order[start : start + batch]
            if len(picked) < 2:
                continue
            with torch.no_grad():
                scalogram = cache[picked] if cache is not None else features(signals[picked])
            loss = torch.nn.functional.cross_entropy(model.head(scalogram), labels[picked], label_smoothing=0.05)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    seconds = time.perf_counter() - started
    model.eval()
    with torch.no_grad():
        predicted = model.head(features(val[0]) if cache is None else model.scalogram(val[0])).argmax(1)
    return seconds, float(f1_score(val[1], predicted, average="macro"))


def run(quick: bool = False) -> dict:
    import tempfile
    from pathlib import Path

    torch.set_num_threads(max(1, torch.get_num_threads()))
    per_class, epochs = (100, 5) if quick else (150, 8)
    bank, _ = generate_filter_bank()
    matrix, _ = bank.padded()
    with tempfile.TemporaryDirectory() as scratch:
        train, val = _data(Path(scratch), per_class)
    args = ModelArgs(n_filters=112, kernel_size=matrix.shape[1], n_classes=5, signal_length=train[0].shape[-1],
                     stem=TrainConfig().stem)
    ours = HybridCWTNet(args, torch.from_numpy(matrix))
    torch.manual_seed(0)
    baseline = HybridCWTNet(replace(args, stem="pool"), torch.from_numpy(matrix))  # the original head: conv + pool
    baseline.load_state_dict(ours.state_dict())  # same parameters (pooling has none): same starting point
    per_layer = PerLayerFrontEnd(list(bank.filters), hop=args.hop)
    ours = training_layout(ours)  # the original recipe kept the default (NCHW) layout

    def cached(signals):  # the fused front-end, once per signal
        return torch.cat([ours.scalogram(signals[i : i + 256]) for i in range(0, len(signals), 256)])

    def original(signals):  # 112 convolutions on every batch, every epoch
        return per_layer(_standardise(signals))

    ours_s, ours_f1 = _train(ours, cached, train, val, epochs)
    base_s, base_f1 = _train(baseline, original, train, val, epochs)
    n = len(train[1]) * epochs
    rows = [
        {"trainer": "original style (per-layer front-end per batch, pool stem)", "seconds": base_s, "signals_per_s": n / base_s, "val_macro_f1": base_f1},
        {"trainer": f"cwtops (cached scalograms, channels_last, {args.stem} stem)", "seconds": ours_s, "signals_per_s": n / ours_s, "val_macro_f1": ours_f1},
    ]
    ratio = base_s / ours_s
    holds = ratio >= TARGET and abs(ours_f1 - base_f1) <= 0.05
    print_table(f"training, {epochs} epochs x {len(train[1])} signals: speed-up {ratio:.2f}x (target >= {TARGET}x at equal accuracy: {'holds' if holds else 'MISSED'})",
                rows, ["trainer", "seconds", "signals_per_s", "val_macro_f1"])
    return {"rows": rows, "ratio": ratio, "target": TARGET, "holds": holds, "epochs": epochs}


def main() -> None:
    cli_main(run, "train.json", __doc__)


if __name__ == "__main__":
    main()
