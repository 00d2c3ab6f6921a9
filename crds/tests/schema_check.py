"""Validates custom resource fixtures against the structural schemas of the generated CRDs.

Prints one line per fixture: `<file>\t<comma-separated paths of the fields refused>`, empty when
the fixture conforms. The CEL rules are checked from Rust (kube's client-side evaluator); this
covers what the API server checks before them: types, enums, patterns, bounds.
"""
import pathlib
import sys

import jsonschema
import yaml


def main(manifests: pathlib.Path, fixtures: list[pathlib.Path]) -> None:
    schemas = {}
    for crd_file in sorted(manifests.glob("*.yaml")):
        crd = yaml.safe_load(crd_file.read_text())
        for version in crd["spec"]["versions"]:
            api_version = f'{crd["spec"]["group"]}/{version["name"]}'
            schemas[(api_version, crd["spec"]["names"]["kind"])] = version["schema"]["openAPIV3Schema"]
    for fixture in fixtures:
        obj = yaml.safe_load(fixture.read_text())
        schema = schemas[(obj["apiVersion"], obj["kind"])]
        errors = jsonschema.Draft4Validator(schema).iter_errors(obj)
        paths = sorted({".".join(str(p) for p in error.absolute_path) for error in errors})
        print(f"{fixture.name}\t{','.join(paths)}")


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]), [pathlib.Path(p) for p in sys.argv[2:]])
