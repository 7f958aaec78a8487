"""Typed params: the shipped file validates; unknown keys and wrong types name the key."""

from __future__ import annotations

import pytest

from cwtops.core.config import flatten, load_params, params_from_dict
from cwtops.core.errors import CwtopsError


def test_shipped_params_validate() -> None:
    params = load_params("params.yaml")
    assert params.base.seed == 42 and params.balance.cap_factor == 3
    assert flatten(params)["train.epochs"] == str(params.train.epochs)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"train": {"epoch": 3}}, "unknown key 'train.epoch'"),
        ({"trian": {}}, "unknown key 'trian'"),
        ({"train": {"lr": "fast"}}, "'train.lr'"),
        ({"balance": {"cap_factor": -1}}, "'balance.cap_factor'"),
        ({"base": {"model_name": "../evil"}}, "'base.model_name'"),
        ({"rollout": {"promotion": "sometimes"}}, "'rollout.promotion'"),
        ({"train": {"dilations": []}}, "'train.dilations'"),
        ({"train": {"dilations": [[1, 2, 4, 8], [1, 0, 2, 2]]}}, "'train.dilations'"),
        ({"train": {"quantiles": 1}}, "'train.quantiles'"),
        ({"train": {"quantile_weight": 1.0}}, "'train.quantile_weight'"),
    ],
)
def test_bad_params_name_the_key(raw: dict, message: str) -> None:
    with pytest.raises(CwtopsError, match=message.replace(".", r"\.")):
        params_from_dict(raw, "params.yaml")


def test_dilations_take_one_branch_or_a_list_of_branches() -> None:
    assert params_from_dict({"train": {"dilations": [1, 2, 4, 8]}}, "p").train.dilations == (1, 2, 4, 8)
    two = params_from_dict({"train": {"dilations": [[3, 12, 24, 48], [1, 2, 4, 8]]}}, "p").train.dilations
    assert [tuple(branch) for branch in two] == [(3, 12, 24, 48), (1, 2, 4, 8)]


def test_code_defaults_equal_the_shipped_params_yaml() -> None:
    """A section left out of params.yaml behaves exactly as the shipped file says."""
    from pathlib import Path

    from cwtops.core.config import Params, load_params

    shipped = load_params(Path(__file__).resolve().parent.parent / "params.yaml").model_dump(mode="json")
    assert Params().model_dump(mode="json") == shipped
