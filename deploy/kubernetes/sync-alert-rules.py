#!/usr/bin/env python3
"""Writes prometheusrule.yaml from deploy/prometheus/alerts.yml: the same rule groups, text
and comments included, inside a Prometheus Operator PrometheusRule.

    python deploy/kubernetes/sync-alert-rules.py

Run it after changing alerts.yml; tests/deploy/test_kubernetes.py fails while they differ.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
RULES = HERE.parent / "prometheus" / "alerts.yml"
TARGET = HERE / "prometheusrule.yaml"

HEADER = """\
# GENERATED from deploy/prometheus/alerts.yml by deploy/kubernetes/sync-alert-rules.py:
# edit alerts.yml (and its unit tests, alerts_test.yml), then run the script. A test checks
# that the groups here are exactly those of alerts.yml.
# The Prometheus Operator loads it into every Prometheus whose ruleSelector matches its
# labels (kube-prometheus-stack selects `release: <its release name>` unless told otherwise).
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: multimodal-engine
  labels:
    app.kubernetes.io/name: multimodal-engine
    app.kubernetes.io/component: monitoring
spec:
"""


def render(rules_text: str) -> str:
    """The PrometheusRule for the rule file ``rules_text``: everything from its top-level
    ``groups:`` on, indented under ``spec``. Raises ValueError when it has no ``groups:``."""
    lines = rules_text.splitlines()
    try:
        start = lines.index("groups:")
    except ValueError:
        raise ValueError(f"{RULES}: no top-level 'groups:' line") from None
    body = "".join(f"  {line}\n" if line.strip() else "\n" for line in lines[start:])
    return HEADER + body


def main() -> None:
    TARGET.write_text(render(RULES.read_text()))
    print(f"wrote {TARGET}")


if __name__ == "__main__":
    main()
