"""The statistics of a comparison (:mod:`lora_tsd.app.experiments.statistics`): Student-t quantiles against
printed tables, intervals and mean/std against Python's own ``statistics``, and the errors for bad input."""

from __future__ import annotations

import math
import statistics

import pytest

from lora_tsd.app.experiments.statistics import betainc, confidence_interval, mean_std, t_cdf, t_quantile
from lora_tsd.errors import ConfigError

# two-sided 95 % quantiles t_{0.975, df} (standard tables)
T975 = {1: 12.7062047, 2: 4.3026527, 3: 3.1824463, 4: 2.7764451, 5: 2.5705818, 9: 2.2621572, 10: 2.2281389,
        20: 2.0859634, 30: 2.0422725, 100: 1.9839715}


@pytest.mark.parametrize("df", sorted(T975))
def test_t_quantile_matches_tables(df):
    assert t_quantile(0.975, df) == pytest.approx(T975[df], abs=2e-7)
    assert t_cdf(T975[df], df) == pytest.approx(0.975, abs=1e-8)


def test_t_quantile_other_levels():
    assert t_quantile(0.995, 1) == pytest.approx(63.6567412, abs=1e-6)
    assert t_quantile(0.95, 4) == pytest.approx(2.1318468, abs=1e-6)
    assert t_quantile(0.75, 1) == pytest.approx(1.0, abs=1e-9)  # Cauchy quartile
    assert t_quantile(0.025, 4) == pytest.approx(-T975[4], abs=2e-7)
    assert t_quantile(0.975, 1e6) == pytest.approx(1.959964, abs=1e-5)  # → the normal quantile


def test_confidence_interval_direct():
    values = [0.012, -0.004, 0.02, 0.008, 0.001]
    mean, low, high = confidence_interval(values)
    half = T975[4] * statistics.stdev(values) / math.sqrt(5)
    assert mean == pytest.approx(statistics.mean(values))
    assert (low, high) == pytest.approx((mean - half, mean + half))
    assert all(math.isnan(x) for x in confidence_interval([0.3])[1:])


def test_mean_std_is_the_sample_std():
    values = [0.71, 0.74, 0.69, 0.80]
    assert mean_std(values) == pytest.approx((statistics.mean(values), statistics.stdev(values)), abs=1e-15)
    assert mean_std([0.5]) == (0.5, 0.0)
    assert all(math.isnan(x) for x in mean_std([]))


def test_bad_arguments_are_refused():
    with pytest.raises(ConfigError, match="betainc needs 0 <= x <= 1, got 1.5"):
        betainc(1.0, 1.0, 1.5)
    with pytest.raises(ConfigError, match="degrees of freedom must be positive, got 0"):
        t_cdf(1.0, 0)
    with pytest.raises(ConfigError, match=r"p must be in \(0, 1\), got 1.0"):
        t_quantile(1.0, 3)
