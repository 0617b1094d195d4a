"""The OpenMP wait policy: spin on a free machine, sleep at once on a busy one, the user's setting always wins."""

from __future__ import annotations

import subprocess
import sys

import pytest

from faceveil.runtime.openmp import CHOSEN_BY_US, busy_share, choose_wait_policy


def _never_called() -> float:
    raise AssertionError("the machine was measured although the user had chosen")


@pytest.mark.parametrize("name,value", [("OMP_WAIT_POLICY", "ACTIVE"), ("OMP_WAIT_POLICY", "PASSIVE"),
                                        ("GOMP_SPINCOUNT", "1000")])
def test_the_users_own_setting_is_kept_and_nothing_is_measured(name: str, value: str) -> None:
    env = {name: value}
    choose_wait_policy(env, measure=_never_called)
    assert env == {name: value}


def test_a_busy_machine_gets_passive_waiting_and_a_free_one_libgomps_default() -> None:
    busy, free = {}, {}
    assert choose_wait_policy(busy, measure=lambda: 0.5) == "PASSIVE"
    assert busy == {"OMP_WAIT_POLICY": "PASSIVE", CHOSEN_BY_US: "1"}
    assert choose_wait_policy(free, measure=lambda: 0.05) is None
    assert free == {}
    unknown = {}
    assert choose_wait_policy(unknown, measure=lambda: None) is None and unknown == {}


def test_a_policy_inherited_from_a_parent_faceveil_is_decided_again() -> None:
    env = {"OMP_WAIT_POLICY": "PASSIVE", CHOSEN_BY_US: "1"}
    assert choose_wait_policy(env, measure=lambda: 0.0) is None
    assert env == {}


def test_busy_share_is_a_share_of_cpu_time() -> None:
    share = busy_share(0.05)
    if share is None:
        pytest.skip("no /proc/stat on this system")
    assert 0.0 <= share <= 1.0


def test_the_choice_is_made_before_torch_loads() -> None:
    code = ("import os, sys; import faceveil; assert 'torch' not in sys.modules; "
            "print(os.environ.get('OMP_WAIT_POLICY'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"OMP_WAIT_POLICY": "ACTIVE", "PATH": ""})
    assert out.stdout.strip() == "ACTIVE"
