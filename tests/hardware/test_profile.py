"""Hardware profiles: typed schema, validation messages that name the key, shipped profiles."""
from pathlib import Path

import pytest
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from ee_nas.hardware.profile import FIELDS, OBJECTIVES, HardwareProfile, make_profile
from ee_nas import CONF_DIR

CONF = CONF_DIR / "hardware"


def test_macs_targets_and_energy_keep_their_behaviour():
    assert HardwareProfile().target(1e6) is None
    assert HardwareProfile(target_fraction=0.25).target(4e6) == 1e6
    assert HardwareProfile(target_macs=2.7e6).target(1e9) == 2.7e6
    assert HardwareProfile(energy_per_mac_pj=10.0).energy_mj(1e6) == pytest.approx(0.01)
    assert HardwareProfile().energy_mj(1e6) is None


def test_latency_targets_are_in_ms():
    p = HardwareProfile(objective="latency", latency_lut="measure", target_latency_ms=2.5)
    assert (p.target(10.0), p.unit, p.uses_latency) == (2.5, "ms", True)
    assert HardwareProfile(objective="latency", latency_lut="measure", target_fraction=0.5).target(4.0) == 2.0


@pytest.mark.parametrize("kwargs, match", [
    ({"objective": "flops"}, r"hardware\.objective='flops'.*valid: macs, latency"),
    ({"target_macs": -1.0}, r"hardware\.target_macs=-1\.0.*must be > 0"),
    ({"target_macs": 0}, r"hardware\.target_macs=0.*must be > 0"),
    ({"objective": "latency", "latency_lut": "measure", "target_latency_ms": 0.0},
     r"hardware\.target_latency_ms=0\.0.*must be > 0"),
    ({"target_fraction": 1.5}, r"hardware\.target_fraction=1\.5.*\(0, 1\]"),
    ({"target_fraction": 0.0}, r"hardware\.target_fraction=0\.0"),
    ({"max_params": -5}, r"hardware\.max_params=-5"),
    ({"max_memory_bytes": 0}, r"hardware\.max_memory_bytes=0.*must be > 0"),
    ({"lut_threads": 0}, r"hardware\.lut_threads=0.*integer >= 1"),
    ({"target_macs": 1e6, "target_fraction": 0.5}, r"hardware\.target_macs=.*hardware\.target_fraction="),
    ({"target_latency_ms": 3.0}, r"hardware\.target_latency_ms=3\.0.*objective=latency"),
    ({"objective": "latency", "target_fraction": 0.5}, r"hardware\.latency_lut=None.*measure"),
    ({"objective": "latency", "latency_lut": "measure", "target_macs": 1e6}, r"hardware\.target_macs=.*objective=macs"),
])
def test_invalid_values_name_the_key_and_the_valid_range(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_profile(**kwargs)


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match=r"unknown hardware key\(s\) hardware\.target_lat\b.*valid keys: name"):
        make_profile(name="x", target_lat=3)


def test_yaml_strings_are_numbers():
    assert make_profile(target_macs="2.7e6", max_memory_bytes="262144").target(1.0) == 2.7e6
    with pytest.raises(ValueError, match=r"hardware\.max_params='many'.*number"):
        make_profile(max_params="many")


def test_caps():
    p = HardwareProfile(max_params=100, max_memory_bytes=1000)
    assert p.violations(params=100, memory_bytes=1000) == []
    assert len(p.violations(params=101, memory_bytes=1001)) == 2
    assert HardwareProfile().violations(params=10**9, memory_bytes=10**12) == []


def test_cap_excess_is_the_sum_of_relative_excesses():
    p = HardwareProfile(max_params=100, max_memory_bytes=1000)
    assert p.cap_excess(params=100, memory_bytes=1000) == 0.0
    assert p.cap_excess(params=150, memory_bytes=900) == pytest.approx(0.5)
    assert p.cap_excess(params=150, memory_bytes=1200) == pytest.approx(0.5 + 0.2)
    assert HardwareProfile(max_params=100).cap_excess(params=90, memory_bytes=10**12) == 0.0
    assert p.caps == ["hardware.max_params=100", "hardware.max_memory_bytes=1000"]
    assert HardwareProfile().caps == []


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_profiles_list_every_key_and_instantiate(path):
    cfg = OmegaConf.load(path)
    assert set(cfg) - {"_target_"} == set(FIELDS), "a shipped profile lists every key, so users see them"
    profile = instantiate(cfg)
    assert isinstance(profile, HardwareProfile) and profile.objective in OBJECTIVES


def test_local_cpu_measures_this_machine_with_a_fractional_latency_target():
    p = instantiate(OmegaConf.load(CONF / "local_cpu.yaml"))
    assert (p.objective, p.latency_lut, p.lut_threads) == ("latency", "measure", 1)
    assert p.target_fraction is not None and p.target(8.0) == pytest.approx(8.0 * p.target_fraction)


def test_unknown_key_in_a_profile_yaml_fails_through_instantiate():
    cfg = OmegaConf.load(CONF / "default.yaml")
    cfg.target_latncy_ms = 3.0
    with pytest.raises(InstantiationException, match=r"hardware\.target_latncy_ms"):
        instantiate(cfg)
