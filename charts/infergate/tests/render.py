"""Lints and renders the chart with real Helm (v4, the library inside the PyPI package
helm-python-sdk) and prints one JSON object for the Rust tests in e2e/tests/chart.rs:

    {"lint": {values file: [messages]},
     "rendered": {values file: [objects]},
     "refused": {case: error or null}}

Values files: the defaults and each file of ci/. "refused" holds the schema's verdict on a set
of bad values (null means accepted).
"""

import json
import pathlib
import sys

import helm_python as helm
import yaml

CHART = pathlib.Path(__file__).resolve().parent.parent

BAD_VALUES = {
    "unknown top-level key": {"proxi": {"replicas": 2}},
    "zero proxy replicas": {"proxy": {"replicas": 0}},
    "unknown service type": {"proxy": {"service": {"type": "Ingress"}}},
    "node port out of range": {"proxy": {"service": {"type": "NodePort", "nodePort": 80}}},
    "pull policy": {"images": {"pullPolicy": "Sometimes"}},
    "image name with a tag": {"runtime": {"image": "runtime:latest"}},
    "digest without its algorithm": {"images": {"digests": {"proxy": "2222"}}},
    "memory quantity": {"proxy": {"resources": {"limits": {"memory": "lots"}}}},
    "tls without host": {"proxy": {"ingress": {"enabled": True, "tlsSecretName": "cert"}}},
    "service monitor interval": {"metrics": {"serviceMonitor": {"interval": "often"}}},
    "zero default timeout": {"timeouts": {"defaultSeconds": 0, "maxSeconds": 600}},
    "runtime memory": {"runtime": {"defaultResources": {"memory": "a lot"}}},
}

# Valid by the schema, refused by the templates.
BAD_RENDERS = {
    "grace shorter than the longest deadline": {"proxy": {"gracePeriodSeconds": 60}},
}


def values_files():
    yield "default", {}
    for path in sorted((CHART / "ci").glob("*.yaml")):
        yield path.name, yaml.safe_load(path.read_text())


def main():
    namespace = sys.argv[1] if len(sys.argv) > 1 else "infergate-system"
    chart = helm.Chart.load(CHART)
    report = {"lint": {}, "rendered": {}, "refused": {}}
    for name, values in values_files():
        linted = helm.lint(CHART, values, strict=True, namespace=namespace, kube_version="v1.33.0")
        report["lint"][name] = linted["messages"] + [{"severity": 3, "error": e} for e in linted["errors"]]
        rendered = chart.render(values, name="infergate", namespace=namespace, is_install=True)
        objects = []
        for template, text in sorted(rendered.items()):
            if template.endswith("NOTES.txt"):
                continue
            objects.extend(o for o in yaml.safe_load_all(text) if o)
        report["rendered"][name] = objects
    for case, values in BAD_VALUES.items():
        try:
            chart.validate_schema(chart.merge_values(values))
            report["refused"][case] = None
        except helm.HelmError as error:
            report["refused"][case] = str(error)
    for case, values in BAD_RENDERS.items():
        try:
            chart.render(values, name="infergate", namespace=namespace, is_install=True)
            report["refused"][case] = None
        except helm.HelmError as error:
            report["refused"][case] = str(error)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
