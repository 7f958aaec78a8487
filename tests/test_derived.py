"""Settings derived from the data (`auto` in params.yaml): short, long, many-class and tiny datasets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cwtops.core import derived
from cwtops.core.config import BalanceConfig, params_from_dict
from cwtops.core.errors import CwtopsError
from cwtops.data.weights import (
    DEFAULT_W0,
    default_bank_w0,
    fit_warnings,
    fitted_filter_bank,
    generate_filter_bank,
    is_default_bank,
)
from cwtops.model.network import HybridCWTNet, ModelArgs, receptive_field
from tasks.balance import balance_manifest
from tests.test_balance import manifest


@pytest.mark.parametrize(("length", "hop"), [(24, 1), (255, 1), (256, 1), (300, 1), (512, 2), (720, 2), (2048, 8), (5000, 19)])
def test_hop_leaves_the_head_256_to_511_steps(length: int, hop: int) -> None:
    assert derived.auto_hop(length) == hop
    steps = length // hop
    assert steps == length if length < 256 else 256 <= steps < 512


@pytest.mark.parametrize(("n_train", "batch"), [(1, 8), (20, 8), (50, 8), (390, 32), (640, 64), (100_000, 64)])
def test_batch_size_is_a_power_of_two_from_8_to_64(n_train: int, batch: int) -> None:
    assert derived.auto_batch_size(n_train) == batch


def test_schedule_follows_the_training_set_size_and_the_heads_cost() -> None:
    flops = 5e7  # forward FLOPs of the default head on ~150 time steps
    tiny, small, large, huge = (derived.auto_epochs(n, flops) for n in (2, 400, 3600, 1_000_000))
    assert tiny == derived.MAX_EPOCHS and huge == derived.MIN_EPOCHS
    assert tiny >= small >= large >= huge
    spent = small * derived.epoch_cost(400, flops)  # where no bound binds, the budget holds
    assert derived.FLOP_BUDGET * 0.97 <= spent <= derived.FLOP_BUDGET
    assert derived.auto_epochs(400, 4 * flops) < small  # a costlier head trains fewer epochs


def test_explicit_values_win_and_auto_ones_are_listed() -> None:
    fixed = derived.train_settings(4, 12, 32, 5, signal_length=2048, n_train=1000)
    assert (fixed.hop, fixed.epochs, fixed.batch_size, fixed.patience, fixed.derived) == (4, 12, 32, 5, ())
    auto = derived.train_settings("auto", "auto", "auto", "auto", signal_length=24, n_train=67)
    assert auto.derived == ("parse.hop", "train.batch_size", "train.epochs", "train.patience")
    assert auto.patience == auto.epochs  # no validation split: nothing stops the schedule early
    validated = derived.train_settings("auto", "auto", "auto", "auto", signal_length=500, n_train=3000, has_val=True)
    assert validated.patience < validated.epochs
    assert auto.summary()["derived"] == list(auto.derived)


def test_many_classes_and_tiny_classes_keep_every_signal_for_training() -> None:
    # 60 classes of 2 signals each and a fixed test split: no validation carve-out, nothing capped away
    counts = {f"c{i:02d}": 2 for i in range(60)}
    split = balance_manifest(manifest(counts, test={label: 3 for label in counts}), BalanceConfig(), seed=0)
    assert (split.split == "train").sum() == 120 and not (split.split == "val").any()
    settings = derived.train_settings("auto", "auto", "auto", "auto", signal_length=300, n_train=120)
    assert settings.epochs == derived.MAX_EPOCHS and settings.batch_size == 8


def test_short_signals_train_and_run_with_the_default_head() -> None:
    bank, _ = fitted_filter_bank(24)
    matrix, _ = bank.padded()
    args = ModelArgs(n_filters=matrix.shape[0], kernel_size=matrix.shape[1], n_classes=2, signal_length=24,
                     hop=derived.auto_hop(24), head="1d", channels=(8, 8, 16, 16), hidden=8)
    model = HybridCWTNet(args, torch.from_numpy(matrix))
    assert model(torch.randn(3, 1, 24)).shape == (3, 2)


def test_default_bank_is_refitted_a_users_bank_is_only_checked() -> None:
    default, _ = generate_filter_bank()
    assert is_default_bank(default)
    mine, _ = generate_filter_bank(scales=112, f_min=0.01)
    assert not is_default_bank(mine)
    for length in (24, 150, 400, 2048):
        fitted, header = fitted_filter_bank(length)
        assert len(fitted.names) == 112 and max(fitted.lengths) <= length
        lowest = header["centre_frequencies"][-1]
        assert lowest == pytest.approx(min(0.2, max(0.004, 2 / length)))
        assert fit_warnings(fitted, length) == []
    long_enough, _ = fitted_filter_bank(500)  # the default range fits: the default bank itself
    assert long_enough.sha256() == default.sha256()
    # a default bank written by an earlier version (w0 6 and 3 in turn, or w0 6 on every scale) is still
    # a default, refitted with its own w0: an existing project's features do not change under it
    assert default_bank_w0(default) == DEFAULT_W0 and default_bank_w0(mine) is None
    for w0 in ((6.0, 3.0), (6.0,)):
        earlier, _ = generate_filter_bank(w0=w0)
        assert default_bank_w0(earlier) == w0
        refitted, header = fitted_filter_bank(150, w0=w0)
        assert header["w0"] == list(w0) and refitted.sha256() != fitted_filter_bank(150)[0].sha256()
        assert fitted_filter_bank(500, w0=w0)[0].sha256() == earlier.sha256()
    warnings = fit_warnings(default, 24)
    assert any("longer than the 24-sample signals" in w for w in warnings)
    assert any("below one cycle per signal" in w for w in warnings)


def test_params_accept_auto_and_numbers_and_name_the_bad_key() -> None:
    params = params_from_dict({"parse": {"hop": 4}, "train": {"epochs": 7}, "balance": {"val_fraction": 0}})
    assert (params.parse.hop, params.train.epochs, params.balance.val_fraction) == (4, 7, 0)
    with pytest.raises(Exception, match="parse.hop"):
        params_from_dict({"parse": {"hop": "fast"}})
    assert np.isfinite(params.train.lr)


def test_small_datasets_spend_the_rest_of_the_budget_on_ensemble_members() -> None:
    flops = 5e7
    assert derived.auto_members(20, flops, 8) == derived.MAX_MEMBERS
    assert derived.auto_members(3600, flops) == 1
    small = derived.train_settings("auto", "auto", "auto", "auto", signal_length=150, n_train=50, members="auto",
                                   forward_flops=lambda hop, channels, hidden: flops)
    assert "train.members" in small.derived and small.members > 1 and small.epochs == derived.MAX_EPOCHS
    assert small.forward_flops == small.members * flops
    spent = small.epochs * derived.epoch_cost(small.n_train, small.forward_flops, small.batch_size, small.members)
    assert spent <= derived.FLOP_BUDGET  # members x full schedule still within the budget
    # tiny signals: the per-step overhead, not the arithmetic, bounds the ensemble
    tiny = derived.train_settings("auto", "auto", "auto", "auto", signal_length=24, n_train=67, members="auto",
                                  forward_flops=lambda hop, channels, hidden: 5e6)
    assert tiny.epochs * derived.epoch_cost(67, tiny.forward_flops, tiny.batch_size, tiny.members) <= derived.FLOP_BUDGET
    assert derived.train_settings(1, 5, 8, 5, 150, 50, members=3).members == 3  # explicit wins


def test_small_training_sets_get_the_narrow_head_and_explicit_widths_win() -> None:
    small = derived.train_settings("auto", "auto", "auto", "auto", signal_length=300, n_train=derived.SMALL_SET,
                                   channels="auto", hidden="auto")
    large = derived.train_settings("auto", "auto", "auto", "auto", signal_length=300, n_train=derived.SMALL_SET + 1,
                                   channels="auto", hidden="auto")
    assert (small.channels, small.hidden) == (derived.NARROW_CHANNELS, derived.NARROW_HIDDEN)
    assert (large.channels, large.hidden) == (derived.WIDE_CHANNELS, derived.WIDE_HIDDEN)
    assert {"train.channels", "train.hidden"} <= set(small.derived)
    fixed = derived.train_settings("auto", "auto", "auto", "auto", signal_length=300, n_train=50,
                                   channels=(8, 8, 16, 16), hidden=12)
    assert (fixed.channels, fixed.hidden) == ((8, 8, 16, 16), 12) and "train.channels" not in fixed.derived
    # the raw channel joins the narrow head on small sets; explicit values win
    assert small.raw_channel is False and large.raw_channel is False  # the default argument: off
    raw_small = derived.train_settings("auto", "auto", "auto", "auto", signal_length=300, n_train=derived.SMALL_SET, raw_channel="auto")
    raw_large = derived.train_settings("auto", "auto", "auto", "auto", signal_length=300, n_train=derived.SMALL_SET + 1, raw_channel="auto")
    assert raw_small.raw_channel and not raw_large.raw_channel and "train.raw_channel" in raw_small.derived
    assert not derived.train_settings(1, 5, 8, 5, 300, 50, raw_channel=False).raw_channel
    assert derived.train_settings(1, 5, 8, 5, 300, 5000, raw_channel=True).raw_channel
    # the narrow head costs less, so the same budget trains more ensemble members
    flops = {derived.NARROW_CHANNELS: 2e6, derived.WIDE_CHANNELS: 8e6}
    narrow = derived.train_settings("auto", "auto", "auto", "auto", signal_length=300, n_train=100, members="auto",
                                    forward_flops=lambda hop, channels, hidden: flops[channels], channels="auto", hidden="auto")
    wide = derived.train_settings("auto", "auto", "auto", "auto", signal_length=300, n_train=100, members="auto",
                                  forward_flops=lambda hop, channels, hidden: flops[channels],
                                  channels=derived.WIDE_CHANNELS, hidden=derived.WIDE_HIDDEN)
    assert narrow.members >= wide.members


@pytest.mark.parametrize(("length", "hop", "wide"), [
    (24, "auto", (1, 4, 8, 16)),     # ItalyPowerDemand: 24 steps, the smallest unit (field 87 steps)
    (150, "auto", (2, 8, 16, 32)),   # GunPoint: field 173 for 150 steps
    (319, "auto", (4, 16, 32, 64)),  # Lightning7: field 345 for 319 steps
    (2048, "auto", (3, 12, 24, 48)),  # the sample data at hop 8: 256 steps, field 259
    (2048, 1, (24, 96, 192, 384)),   # an explicit hop: the field follows the steps the head sees
])
def test_the_receptive_field_follows_the_steps_the_head_sees(length: int, hop: int | str, wide: tuple) -> None:
    settings = derived.train_settings(hop, 5, 8, 5, signal_length=length, n_train=50, dilations="auto")
    # two branches: the wide one, whose field is about the steps the head sees, and the near one
    assert settings.dilations == (wide, derived.NEAR_DILATIONS) and "train.dilations" in settings.derived
    steps = -(-length // settings.hop)
    assert abs(receptive_field(settings.dilations[0]) - steps) <= derived.PATTERN_FIELD // 2 or steps < derived.PATTERN_FIELD
    assert receptive_field(derived.NEAR_DILATIONS) == 47
    explicit = derived.train_settings(hop, 5, 8, 5, signal_length=length, n_train=50, dilations=(1, 2, 4, 8))
    assert explicit.dilations == ((1, 2, 4, 8),) and "train.dilations" not in explicit.derived
    branches = derived.train_settings(hop, 5, 8, 5, signal_length=length, n_train=50, dilations=[(1, 2, 4, 8), (2, 2, 2, 2)])
    assert branches.dilations == ((1, 2, 4, 8), (2, 2, 2, 2))


@pytest.mark.parametrize("bad", [(1, 2, 4), [(1, 2, 4, 8), (1, 0, 1, 1)], ()])
def test_dilations_that_are_not_four_positive_ints_per_branch_are_refused(bad) -> None:
    with pytest.raises(CwtopsError, match="train.dilations"):
        derived.as_branches(bad)
