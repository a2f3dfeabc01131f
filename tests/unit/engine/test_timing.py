"""Timing models: DESIGN 5's fit, measured tables, and how a step is composed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvrouter.engine import DefaultTiming, TableTiming, TimingModel, step_ms
from kvrouter.errors import ConfigError


def test_default_prefill_fit_exact() -> None:
    timing = DefaultTiming()
    # 1.25e-6 * 1000^2 + 7.41e-2 * 1000 + 26.2 = 1.25 + 74.1 + 26.2
    assert timing.prefill_ms(1000) == pytest.approx(101.55, abs=1e-9)
    assert timing.prefill_ms(0) == pytest.approx(26.2, abs=1e-12)
    # 8192: 1.25e-6 * 67108864 + 0.0741 * 8192 + 26.2 = 83.88608 + 607.0272 + 26.2
    assert timing.prefill_ms(8192) == pytest.approx(717.11328, abs=1e-9)


def test_default_decode_fit_exact() -> None:
    timing = DefaultTiming()
    assert timing.decode_ms(0.0) == pytest.approx(19.44, abs=1e-12)
    # -5.47 * 0.25 + 43.88 * 0.5 + 19.44 = -1.3675 + 21.94 + 19.44
    assert timing.decode_ms(0.5) == pytest.approx(40.0125, abs=1e-12)
    assert timing.decode_ms(1.0) == pytest.approx(57.85, abs=1e-12)


def test_default_coefficients_can_be_overridden() -> None:
    timing = DefaultTiming(prefill_a=0.0, prefill_b=1.0, prefill_c=0.0)
    assert timing.prefill_ms(10) == 10.0
    assert isinstance(timing, TimingModel)


def test_step_composition() -> None:
    timing = DefaultTiming()
    assert step_ms(timing, 0, 0, 0.3) == 0.0
    assert step_ms(timing, 1000, 0, 0.3) == pytest.approx(101.55)
    assert step_ms(timing, 0, 5, 0.5) == pytest.approx(40.0125)
    # A mixed step: one forward pass over all prefill tokens plus one decode step.
    assert step_ms(timing, 1000, 5, 0.5) == pytest.approx(101.55 + 40.0125)


def test_table_interpolates_and_extends_linearly() -> None:
    timing = TableTiming(
        prefill=[(1000, 100.0), (0, 20.0), (2000, 300.0)],
        decode=[(0.0, 20.0), (1.0, 60.0)],
    )
    assert timing.prefill_ms(500) == pytest.approx(60.0)
    assert timing.prefill_ms(1000) == pytest.approx(100.0)
    assert timing.prefill_ms(1500) == pytest.approx(200.0)
    assert timing.prefill_ms(3000) == pytest.approx(500.0)  # the last segment, extended
    assert timing.decode_ms(0.25) == pytest.approx(30.0)
    assert timing.decode_ms(-1.0) == 0.0  # extended below zero is clamped


def test_single_point_table_is_constant() -> None:
    timing = TableTiming(prefill=[(100, 42.0)], decode=[(0.5, 7.0)])
    assert timing.prefill_ms(1) == 42.0
    assert timing.decode_ms(0.9) == 7.0


def test_table_from_json(tmp_path: Path) -> None:
    path = tmp_path / "timing.json"
    path.write_text(json.dumps({"prefill": [[0, 10], [100, 20]], "decode": [[0, 5], [1, 15]]}))
    timing = TableTiming.from_path(path)
    assert timing.prefill_ms(50) == pytest.approx(15.0)
    assert timing.decode_ms(0.5) == pytest.approx(10.0)


def test_table_from_csv(tmp_path: Path) -> None:
    path = tmp_path / "timing.csv"
    path.write_text("kind,x,ms\nprefill,0,10\nprefill,100,20\ndecode,0,5\nDecode,1,15\n")
    timing = TableTiming.from_path(path)
    assert timing.prefill_ms(25) == pytest.approx(12.5)
    assert timing.decode_ms(0.1) == pytest.approx(6.0)


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("t.json", '{"prefill": [[0, 1]]}', "decode"),
        ("t.json", '{"prefill": [], "decode": [[0, 1]]}', "no prefill points"),
        ("t.json", "not json", "bad timing table"),
        ("t.csv", "kind,x,ms\nwarmup,0,1\n", "kind must be prefill or decode"),
        ("t.csv", "kind,x,ms\nprefill,zero,1\ndecode,0,1\n", "bad timing table"),
    ],
)
def test_bad_tables_raise_config_errors(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        TableTiming.from_path(path)


def test_missing_table_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        TableTiming.from_path(tmp_path / "absent.json")
