"""The alerting rules (cluster/alerts.yml) load, and fire when they should and only then: promtool's
own checks and unit tests (cluster/alerts.test.yml), and cluster/prometheus.yml loads the rules.
Every condition issue 14 names has its alert, each alert has a test that fires and one that does
not, and every metric an alert queries is one the gateway, Serve or vLLM defines (the real-stack
metrics test checks `tests.promql.alert_metric_names()` against a scrape).

promtool is Debian's `prometheus` package, which `scripts/setup.sh test` installs when it runs as
root: on CI (`CI` set) a missing promtool fails the tests, elsewhere it skips them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import yaml

from tests.promql import ALERTS, ROOT, alert_metric_names, alert_rules, defined_metric_names

ALERT_TESTS = ROOT / "cluster" / "alerts.test.yml"
PROMETHEUS_CONFIG = ROOT / "cluster" / "prometheus.yml"
# The conditions issue 14 names (section 3), and the alert for each.
ISSUE_ALERTS = {
    "TTFT p95 over its SLO": "GatewayTTFTOverSLO",
    "queue length growing": "GatewayQueueGrowing",
    "requests shed": "GatewayRequestsShed",
    "KV-cache usage near full": "GatewayKVCacheNearFull",
    "a model with no ready replica": "GatewayModelNoReadyReplica",
    "replicas at max_replicas with a queue": "GatewayReplicasAtMaxWithQueue",
    "error rate": "GatewayErrorRateHigh",
}
SEVERITIES = {"warning", "critical"}
# Metrics an alert needs that the gateway does not export yet. xfail is strict (pyproject.toml):
# once the gateway exports one, its test passes, fails as XPASS, and its entry goes.


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        reason = "no promtool: apt-get install prometheus (`scripts/setup.sh test` does, as root)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must run the alert tests")
        pytest.skip(reason)
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_promtool_accepts_the_rules(promtool):
    result = run(promtool, "check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_pass_their_unit_tests(promtool):
    result = run(promtool, "test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_prometheus_config_with_the_rules(promtool):
    """The file_sd file exists only on a Ray head: promtool warns of a missing one, and passes."""
    result = run(promtool, "check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in result.stdout, result.stdout
    assert yaml.safe_load(PROMETHEUS_CONFIG.read_text())["rule_files"] == ["alerts.yml"]


def test_every_condition_the_issue_names_has_an_alert():
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names)), f"an alert name used twice: {names}"
    missing = {condition: name for condition, name in ISSUE_ALERTS.items() if name not in names}
    assert not missing, f"no rule for: {missing}"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_each_alert_waits_has_a_severity_and_says_what_fired(rule):
    assert re.fullmatch(r"\d+[smh]", rule.get("for", "")), f"{rule['alert']}: no `for:`"
    assert rule["labels"]["severity"] in SEVERITIES, rule["labels"]
    annotations = rule["annotations"]
    assert annotations.get("summary") and annotations.get("description"), annotations
    if not rule["expr"].lstrip().startswith("absent("):  # an absent series has no labels to name
        assert "$labels." in annotations["summary"] + annotations["description"], annotations


def test_each_alert_has_a_firing_and_a_silent_unit_test():
    tests = yaml.safe_load(ALERT_TESTS.read_text())["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    for rule in alert_rules():
        expected = [case["exp_alerts"] for case in cases if case["alertname"] == rule["alert"]]
        assert any(expected), f"{rule['alert']}: no unit test in which it fires"
        assert not all(expected), f"{rule['alert']}: no unit test in which it stays silent"


def test_the_parser_finds_the_alerts_metrics():
    assert len(alert_metric_names()) >= 7, alert_metric_names()


@pytest.mark.parametrize(
    "name",
    sorted(alert_metric_names()),
)
def test_every_metric_the_alerts_query_is_defined(name):
    assert name in defined_metric_names(), f"nothing defines {name}: its alert would never fire"


def test_shed_reasons_are_codes_the_gateway_answers_with():
    (shed,) = [rule for rule in alert_rules() if rule["alert"] == ISSUE_ALERTS["requests shed"]]
    (pattern,) = re.findall(r'reason=~"([^"]+)"', shed["expr"])
    sources = "".join(path.read_text() for path in (ROOT / "apps").rglob("*.py"))
    unknown = [reason for reason in pattern.split("|") if f'"{reason}"' not in sources]
    assert not unknown, f"no such error code in apps/: {unknown}"
