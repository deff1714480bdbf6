"""The metric names the shipped Prometheus queries use (cluster/grafana-dashboard.json's panels,
cluster/alerts.yml's alerts), and the names the stack can export, read from the code that defines
them: a query of a name nobody exports returns nothing, silently, so tests check each name, here
against the definitions and on the real stack against a scrape."""

from __future__ import annotations

import functools
import json
import re
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "cluster" / "grafana-dashboard.json"
ALERTS = ROOT / "cluster" / "alerts.yml"
# Every series of the stack comes through Ray's metrics agent, which prefixes `ray_`.
METRIC_NAME = re.compile(r"\bray_[a-z0-9_]+")
# `metrics.Gauge("serve_...", ...)`, `ray_metrics.Counter(name="...")`: Ray's own metric classes.
RAY_METRIC = re.compile(r"\bmetrics\.(Counter|Gauge|Histogram)\(\s*(?:name=)?\"([a-z0-9_]+)\"")
# vLLM's Prometheus metrics (`self._gauge_cls(name="vllm:...")`), which its Ray stat logger
# re-creates as Ray metrics with `:` made `_`.
VLLM_METRIC = re.compile(r"_(counter|gauge|histogram)_cls\(\s*name=\"(vllm:[a-z0-9_:]+)\"")
# What Prometheus's exposition makes of each kind of metric.
SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    return set(METRIC_NAME.findall(expr))


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def dashboard_metric_names() -> set[str]:
    return set().union(*(metric_names(expr) for expr in dashboard_exprs()))


def alert_rules() -> list[dict[str, Any]]:
    """Every alerting rule of cluster/alerts.yml, all groups."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def alert_metric_names() -> set[str]:
    return set().union(*(metric_names(rule["expr"]) for rule in alert_rules()))


@functools.cache
def defined_metric_names() -> frozenset[str]:
    """Every name, as scraped, of the metrics that the gateway (apps/), Serve (its `_private`
    package) and vLLM's stat logger (vllm/v1/metrics/loggers.py; not its spec-decode or KV
    connector metrics, defined elsewhere) define."""
    sources = [*(ROOT / "apps").rglob("*.py"), *(package_dir("ray.serve") / "_private").glob("*.py")]
    defined = [m for path in sources for m in RAY_METRIC.findall(path.read_text())]
    vllm = VLLM_METRIC.findall((package_dir("vllm") / "v1" / "metrics" / "loggers.py").read_text())
    defined += [(kind, name.replace(":", "_")) for kind, name in vllm]
    return frozenset(scraped for kind, name in defined for scraped in scraped_names(kind, name))


def package_dir(package: str) -> Path:
    """Where an installed package's source is, without importing it (vLLM imports torch)."""
    spec = find_spec(package)
    assert spec and spec.submodule_search_locations, f"{package} is not installed"
    return Path(spec.submodule_search_locations[0])


def scraped_names(kind: str, name: str) -> list[str]:
    """The series names Prometheus scrapes for a Ray metric (`Counter("x")`: `ray_x_total`)."""
    if kind.lower() == "counter" and name.endswith("_total"):
        return [f"ray_{name}"]
    return [f"ray_{name}{suffix}" for suffix in SUFFIXES[kind.lower()]]
